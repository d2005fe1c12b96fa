"""The stateful learner over the bilevel functions: MAML, Sharp-MAML and Agnostic-SAM as one outer loop.

The math is in :mod:`metasam.meta.functional` (adapt, task loss, meta-gradient over a parameter dict, on the
loop or the vmap path); a :class:`MetaLearner` holds what persists between meta-steps: θ (the model's
parameters), the outer optimizer and scheduler, the outer rule's momentum, the iteration, and how to save
and load them (docs/algorithms.md §3):

    L_meta(θ) = (1/T) Σ_τ L_q^τ(φ_K^τ(θ));  the outer rule turns ∇L_meta into the outer optimizer's input.

A ``reducer`` (:mod:`metasam.meta.distributed`) shares each meta-batch between processes: every
meta-gradient and metric over tasks is a sum over this process's tasks divided by the task count, both
summed over the processes, so the outer rules see the meta-gradient of the whole meta-batch.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metasam.core import cosine_similarity, global_norm
from metasam.data.episodes import TaskBatch
from metasam.data.val_views import val_view_from_spec
from metasam.errors import ConfigError, NonFiniteError
from metasam.meta import learner_state
from metasam.meta.arguments import (
    AdaptSelection,
    adapted_names,
    as_task_batch,
    check_hparams,
    check_initialized,
    check_running_stats,
    learned_inner_lrs,
    nonfinite_step_error,
    outer_optimizer_class,
    refuse_custom_spec,
    resolve_path,
    resolve_task_threads,
)
from metasam.meta.distributed import Reducer
from metasam.meta.functional import (
    InnerLoop,
    LossFn,
    MetaGradient,
    ValView,
    accuracy,
    forward,
    task_alignment,
    meta_gradient_loop,
    meta_gradient_threads,
    thread_copies,
    meta_gradient_vmap,
)
from metasam.meta.adapter import TaskAdapter
from metasam.meta.presets import PRESETS
from metasam.meta.rules import Rule, rule_from_spec


class MetaLearner(TaskAdapter):
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
        task_threads: on the loop path, the number of threads that share the tasks of a meta-batch, each on
            its own copy of the model with one intra-op thread (:func:`~metasam.meta.functional.meta_gradient_threads`);
            1: one task at a time with torch's intra-op threads (the plain loop). "auto" (default): torch's
            intra-op thread count on a CPU, 1 on a GPU, on the vmap path and for models with dropout layers
            (:func:`~metasam.meta.arguments.resolve_task_threads`), and 1 from the first threaded call on
            which the model drew random numbers or could not be copied (that call is made again on the plain
            loop, with a warning); the number in use is ``learner.task_threads``. Each call copies the
            module structure (not the tensors), so a forward pass's side effects on the module and stateful
            hooks act on copies: pass 1 for such models. Values differ from the plain loop's by rounding only.
        reducer: shares meta-batches and evaluation tasks between processes (data parallel, see
            :mod:`metasam.meta.distributed`): each process passes its own tasks and gets
            ∇L_meta = Σ_r Σ_{τ∈S_r} ∇L_q^τ / Σ_r |S_r| of the whole meta-batch. None: one process.
        learn_inner_lr: Meta-SGD (Li et al. 2017): α becomes a tensor per adapted parameter, of its shape,
            starting at ``inner_lr`` everywhere and meta-learned beside θ by the outer optimizer (in a parameter
            group of its own without weight decay) and the outer rule (an outer SAM radius perturbs θ and α
            together); the inner step is φ ← φ − α ⊙ d at training and at test. ``learner.inner_lrs`` holds them,
            keyed by the parameter's name, made on the model's device and dtype: move the model first.
        **rule_params: a shorthand for the preset's rules with other settings, each prefixed by its level:
            ``inner_rho1=0.1`` is ``inner_rule=AgnosticRule(rho1=0.1)`` for agnostic-sam (the settings are
            the fields of :class:`~metasam.meta.rules.SAMRule` and :class:`~metasam.meta.rules.AgnosticRule`),
            checked against the preset's rule at that level; refused at a level whose rule is given.
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
        task_threads: int | str = "auto",
        reducer: Reducer | None = None,
        learn_inner_lr: bool = False,
        **rule_params: Any,
    ) -> None:
        preset_inner, preset_outer = check_hparams(
            algo, inner_lr, inner_steps, test_inner_steps, outer_lr, test_rule, path, **rule_params
        )
        for level, rule in (("inner", inner_rule), ("outer", outer_rule)):
            shorthand = sorted(k for k in rule_params if k.startswith(f"{level}_"))
            if rule is not None and shorthand:
                raise ConfigError(
                    f"{', '.join(shorthand)} set the preset's {level} rule, which {level}_rule= replaces: give the "
                    f"settings to the rule you pass ({level}_rule=AgnosticRule(rho1=...)) or drop {level}_rule=")
        optimizer_class = outer_optimizer_class(outer_optimizer)
        if "lr" in (outer_kwargs or {}):
            raise ConfigError("outer_kwargs holds 'lr': give the outer learning rate as outer_lr= (it is checked and saved there)")
        loss_fn = refuse_custom_spec(loss_fn, "loss_fn")
        outer_scheduler = refuse_custom_spec(outer_scheduler, "outer_scheduler")
        val_view = refuse_custom_spec(val_view, "val_view")
        if isinstance(val_view, dict):  # a view of metasam.data.val_views, as a checkpoint records it
            val_view = val_view_from_spec(val_view)
        check_initialized(model)
        if not allow_running_stats:
            check_running_stats(model)
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.names = list(self.params)
        adapted = None if adapt is None else tuple(adapted_names(model, self.names, adapt))
        self.inner_lrs = learned_inner_lrs(self.params, adapted, inner_lr, learn_inner_lr)
        self.meta_params = self._with_inner_lrs(self.params)  # θ, then α keyed by learned_lr_key: what the outer loop steps
        self.meta_names = list(self.meta_params)
        self.algo = algo
        self.accuracy = loss_fn is None if accuracy is None else accuracy
        self.inner_rule = preset_inner if inner_rule is None else rule_from_spec(inner_rule, "inner")
        self.outer_rule = preset_outer if outer_rule is None else rule_from_spec(outer_rule, "outer")
        self.test_rule = test_rule
        self.test_inner_steps = test_inner_steps or inner_steps
        self.inner = InnerLoop(
            inner_lr, inner_steps, self.inner_rule, PRESETS[algo].first_order if first_order is None else first_order,
            loss_fn or nn.functional.cross_entropy, adapted, val_view,
        )
        self.reducer = reducer
        groups = [{"params": list(self.params.values())}]
        if self.inner_lrs:  # a step size decayed towards 0 would be a regulariser nobody asked for
            groups.append({"params": list(self.inner_lrs.values()), "weight_decay": 0.0})
        self.outer_optimizer = optimizer_class(groups, lr=outer_lr, **(outer_kwargs or {}))
        self.outer_scheduler = None if outer_scheduler is None else outer_scheduler(self.outer_optimizer)
        self.outer_momentum: list[Tensor] | None = None
        self.iteration = 0
        self._outputs: int | None = None  # the model's output size, measured by _checked
        self.path = resolve_path(path, model)
        self.task_threads = resolve_task_threads(task_threads, self.path, model)
        self._auto_threads = task_threads == "auto"
        self._pool: ThreadPoolExecutor | None = None  # the task threads, kept warm between meta-steps
        self.hparams = learner_state.constructor_record(
            self, test_inner_steps=test_inner_steps, first_order=first_order, outer_lr=outer_lr, outer_optimizer=optimizer_class,
            outer_kwargs=outer_kwargs, loss_fn=loss_fn, outer_scheduler=outer_scheduler, allow_running_stats=allow_running_stats,
        )

    # -- meta-training ---------------------------------------------------------------------------
    def _meta_gradient(self, params: dict[str, Tensor], batch: TaskBatch) -> MetaGradient:
        """∇_θ L_meta at ``params`` and the mean query loss and accuracy, of the whole meta-batch when a
        reducer shares it (one all-reduce of the sums over this process's tasks and of their count)."""
        if self.reducer is None:
            return self._run_tasks(params, batch, "mean")
        total = self._run_tasks(params, batch, "sum")
        *grads, loss, acc = self._task_mean([*total.grads.values(), total.loss, total.accuracy], batch.support_x.shape[0])
        return MetaGradient(dict(zip(self.meta_names, grads)), loss, acc)

    def _run_tasks(self, params: dict[str, Tensor], batch: TaskBatch, reduction: str) -> MetaGradient:
        """This process's tasks on the vmap path, the plain loop, or ``min(task_threads, tasks)`` task threads.

        With ``task_threads="auto"`` the threaded call is checked: if the model drew from torch's random
        generator, or cannot be copied, the call is made again on the plain loop from the same generator
        state, and the learner keeps one thread from then on (with a warning)."""
        if self.path == "vmap":
            return meta_gradient_vmap(self.model, params, batch, self.inner, self.accuracy, reduction)
        threads = min(self.task_threads, batch.support_x.shape[0])
        if threads > 1:
            try:
                copies = thread_copies(self.model, threads)
            except ConfigError:
                if not self._auto_threads:
                    raise
                copies, why = None, "cannot be copied"
            if copies is not None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.task_threads)
                    weakref.finalize(self, self._pool.shutdown, wait=False)
                rng = torch.random.get_rng_state()
                result = meta_gradient_threads(copies, params, batch, self.inner, self.accuracy, reduction, pool=self._pool)
                if not self._auto_threads or torch.equal(rng, torch.random.get_rng_state()):
                    return result
                torch.random.set_rng_state(rng)  # the plain loop below draws what it would have drawn
                why = "draws random numbers"
            warnings.warn(f"task_threads='auto': the model {why}, so its tasks run one at a time from now on "
                          "(pass task_threads=1 to choose it)", stacklevel=2)
            self.task_threads = 1
        return meta_gradient_loop(self.model, params, batch, self.inner, self.accuracy, reduction)

    def _outer_direction(self, batch: TaskBatch, val_batch: Sequence[Tensor] | None):
        metrics: dict[str, Tensor] = {}

        def meta_grad(values: Sequence[Tensor], of: TaskBatch = batch) -> list[Tensor]:
            result = self._meta_gradient(dict(zip(self.meta_names, values)), of)
            if of is batch:  # the first call is at θ
                metrics.setdefault("query_loss", result.loss)
                if self.accuracy:
                    metrics.setdefault("query_acc", result.accuracy)
            return list(result.grads.values())

        val_fn = None
        if self.outer_rule.name == "agnostic":
            if val_batch is None:
                raise ConfigError(
                    f"{self.algo}'s agnostic outer rule needs a validation meta-batch (val_batch=) of tasks drawn "
                    "from the meta-training classes, separate from the training meta-batch"
                )
            val_fn = lambda values: meta_grad(values, as_task_batch(val_batch))  # noqa: E731
        theta = list(self._theta().values())
        direction, state, stats = self.outer_rule.direction(meta_grad, theta, self.outer_momentum, val_fn)
        return direction, state, {**metrics, **{f"outer_{k}": v for k, v in stats.items()}}

    def meta_gradient(self, batch: Sequence[Tensor], val_batch: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The direction the outer rule feeds to the outer optimizer, keyed like ``named_parameters`` (and the
        learned step sizes of ``learn_inner_lr`` by :func:`~metasam.meta.functional.learned_lr_key`).

        For the plain outer rule this is ∇L_meta(θ). No step is taken; the outer rule's momentum
        (agnostic outer) is not advanced either. ``val_batch``, a validation meta-batch, is required (else
        :class:`ConfigError`) under the agnostic outer rule and unused otherwise. With a ``reducer``, ``batch``
        (and ``val_batch``) hold this process's tasks and the direction is that of the whole meta-batch, the
        same on every process.
        """
        direction, _, _ = self._outer_direction(self._checked(as_task_batch(batch)), val_batch)
        return {n: g.detach() for n, g in zip(self.meta_names, direction)}

    def meta_step(
        self, batch: Sequence[Tensor], val_batch: Sequence[Tensor] | None = None, pre_adaptation: bool = False,
        alignment: bool = False,
    ) -> dict[str, float]:
        """One outer step on ``batch``; returns metrics (query loss / accuracy after adaptation and,
        with ``pre_adaptation=True``, before it; ``meta_grad_norm``, the norm of the direction given to the
        outer optimizer, ∇L_meta(θ + ε) under the sam and agnostic outer rules, and ``outer_grad_norm``,
        ‖∇L_meta(θ)‖; cos(g_S, g_V) where the agnostic outer rule runs). The "before" metrics cost an extra
        forward pass over every query set (about a fifth of a second-order MAML step), so they are off unless
        asked for.

        ``alignment=True`` adds the gradient alignment before and after the update, on the same batches:
        ``outer_cos_before`` / ``outer_cos_after`` (:meth:`outer_alignment` at θ and at the new θ, on
        ``batch`` and ``val_batch``, which it then needs whatever the outer rule) and ``inner_cos_before``
        / ``inner_cos_after`` (:meth:`inner_alignment`). It costs four more meta-gradients and the inner
        diagnostic's passes: a diagnostic to take every few steps, not at every one.

        With ``learn_inner_lr``, the meta-parameters are θ and α: the norms and the outer cosines are taken over
        both, as the outer optimizer and the outer rule see them, and ``inner_lr_mean`` / ``inner_lr_min`` /
        ``inner_lr_max`` give the learned step sizes over all their entries after the step."""
        batch = self._checked(as_task_batch(batch))
        aligned = {}
        if alignment:
            if val_batch is None:
                raise ConfigError("meta_step(alignment=True) needs val_batch=, the validation meta-batch g_V is taken on")
            inner = self.inner_alignment(batch)
            aligned = {"outer_cos_before": self.outer_alignment(batch, val_batch),
                       "inner_cos_before": inner[0], "inner_cos_after": inner[1]}
        direction, state, metrics = self._outer_direction(batch, val_batch)
        norm = global_norm(direction)
        if not (torch.isfinite(norm) and torch.isfinite(metrics["query_loss"])):
            raise self._nonfinite_error(metrics["query_loss"], direction)
        before = self._pre_adaptation(batch) if pre_adaptation else {}
        for n, g in zip(self.meta_names, direction):
            self.meta_params[n].grad = g.detach()
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        if self.outer_scheduler is not None:
            self.outer_scheduler.step()
        self.outer_momentum = None if state is None else [m.detach() for m in state]
        self.iteration += 1
        out = {k: float(v) for k, v in metrics.items()}
        out.update(before)
        out["meta_grad_norm"] = float(norm)
        if self.inner_lrs:  # where the learned step sizes went, after this step
            every = torch.cat([a.detach().flatten() for a in self.inner_lrs.values()])
            out.update(inner_lr_mean=float(every.mean()), inner_lr_min=float(every.min()), inner_lr_max=float(every.max()))
        if alignment:
            out.update(aligned, outer_cos_after=self.outer_alignment(batch, val_batch))
        return out

    def _nonfinite_error(self, query_loss: Tensor, direction: Sequence[Tensor]) -> NonFiniteError:
        """Name the first non-finite tensor of the step (the query loss, else a parameter's meta-gradient)
        and the settings that tame it, by their names here (``metasam train`` spells them as flags)."""
        tame = {"inner_lr": self.inner_lr, **{f"{level}_{rule.ascent}": getattr(rule, rule.ascent) for level, rule in
                (("inner", self.inner_rule), ("outer", self.outer_rule)) if rule.ascent is not None},
                "outer_lr": self.outer_optimizer.param_groups[0]["lr"]}
        return nonfinite_step_error(self.iteration + 1, query_loss, dict(zip(self.meta_names, direction)), tame)

    def _pre_adaptation(self, batch: TaskBatch) -> dict[str, float]:
        theta = self._theta()
        with torch.no_grad():
            terms = [(self.loss_fn(out, y), accuracy(out, y))
                     for out, y in ((forward(self.model, theta, x), y) for x, y in zip(batch.query_x, batch.query_y))]
            loss, acc = self._task_mean([sum(t[0] for t in terms), sum(t[1] for t in terms)], len(terms))
        return {"query_loss_before": float(loss), **({"query_acc_before": float(acc)} if self.accuracy else {})}

    # -- alignment ---------------------------------------------------------------------------------
    def outer_alignment(self, batch: Sequence[Tensor], val_batch: Sequence[Tensor]) -> float:
        """cos(∇L_meta(θ; batch), ∇L_meta(θ; val_batch)) at the current θ: the seed paper's alignment of
        training and validation gradients (its §5.1), at the outer level. Costs two meta-gradients."""
        g_s, g_v = (list(self._meta_gradient(self._theta(), as_task_batch(b)).grads.values()) for b in (batch, val_batch))
        return float(cosine_similarity(g_s, g_v))

    def inner_alignment(self, batch: Sequence[Tensor]) -> tuple[float, float]:
        """The same alignment at the inner level, before and after each inner step: the means over the tasks
        of ``batch`` and the steps k = 1..K of cos(∇L_s(φ_{k−1}), ∇L_q(φ_{k−1})) and cos(∇L_s(φ_k), ∇L_q(φ_k)),
        φ_k from the inner rule (first order: the same fast weights). g_V is the query set's gradient (its
        labels are known while meta-training): the inner rule's own validation view duplicates the support
        set, where the cosine is 1 by construction."""
        before, after = [], []
        theta = self._theta()
        for task in zip(*as_task_batch(batch)):
            task_before, task_after = task_alignment(self.model, theta, task, self.inner)
            before += task_before
            after += task_after
        mean_before, mean_after = self._task_mean([sum(before), sum(after)], len(before))
        return float(mean_before), float(mean_after)

    # -- state (the format is :mod:`metasam.meta.learner_state`'s) -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Weights, outer optimizer (and scheduler), the agnostic outer momentum and the iteration: enough to
        resume exactly."""
        return learner_state.state_dict(self)

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
        """Restore :meth:`state_dict`'s output. Raises :class:`~metasam.errors.CheckpointError` naming what does
        not fit (missing or unexpected tensors, shapes) and leaves the learner unchanged in that case."""
        learner_state.load_state_dict(self, state, source)

    @classmethod
    def load(cls, run_dir_or_checkpoint: str | Path, which: str = "best", **overrides: Any) -> "MetaLearner":
        """Rebuild a learner (model, preset, hyperparameters, weights) from what ``metasam train`` wrote.

        ``run_dir_or_checkpoint``: a run folder (its ``best.pt``, or ``last.pt`` with ``which="last"``)
        or a checkpoint file. ``overrides`` replace saved constructor arguments (e.g. ``path="vmap"``);
        ``model=`` a module to load the weights into instead of the recorded model, with the same parameter
        names and shapes: ``model=Conv4(ways)`` takes a run that ``metasam train`` ran with ``CPUConv4`` on
        a CPU to a GPU or under vmap, where ``CPUConv4`` refuses. Anything else is refused naming the
        differing tensors. The file is read with ``weights_only=True``: loading it never runs code from it.
        """
        return learner_state.load(cls, run_dir_or_checkpoint, which, **overrides)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], source: str | Path = "the checkpoint", **overrides: Any) -> "MetaLearner":
        """:meth:`load` for a checkpoint already read by :func:`metasam.checkpoint.load_checkpoint`;
        ``source`` names it in errors."""
        return learner_state.from_checkpoint(cls, ckpt, source, **overrides)
