"""θ and how it adapts to a task: the part of a :class:`~metasam.meta.MetaLearner` that meta-test needs (fast
weights, predictions, per-task accuracy and loss), apart from the outer loop, its optimizer and its checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from metasam.data.episodes import TaskBatch
from metasam.errors import ConfigError
from metasam.meta.arguments import check_labels
from metasam.meta.distributed import Reducer
from metasam.meta.functional import InnerLoop, accuracy, adapt, forward, forward_each, learned_lr_key
from metasam.meta.rules import Rule, make_rule
from metasam.stats import mean_ci95


class TaskAdapter:
    """A model's trainable parameters θ, the inner loop that adapts them to a task (``inner``: rule, α, K,
    first order, loss; ``inner_lrs``: Meta-SGD's learned α per parameter, {} for the scalar α) and the meta-test
    settings (``test_rule`` "same" or "gd", ``test_inner_steps``). :class:`~metasam.meta.MetaLearner` sets these
    attributes in its constructor and adds the outer loop."""

    model: nn.Module
    params: dict[str, Tensor]
    names: list[str]
    inner_lrs: dict[str, Tensor]
    inner: InnerLoop
    inner_rule: Rule
    test_rule: str
    test_inner_steps: int
    accuracy: bool
    reducer: Reducer | None
    _outputs: int | None

    # -- the settings, by the names of the paper ----------------------------------------------------
    inner_lr = property(lambda self: self.inner.inner_lr, doc="α, the inner step size (learn_inner_lr: its start).")
    inner_steps = property(lambda self: self.inner.steps, doc="K, the inner steps at meta-training.")
    first_order = property(lambda self: self.inner.first_order, doc="Whether the inner gradients are constants of θ.")
    loss_fn = property(lambda self: self.inner.loss_fn, doc="(output, target) → loss of a task's batch.")
    val_view = property(lambda self: self.inner.val_view, doc="The agnostic inner rule's validation view.")

    def test_loop(self, steps: int | None = None, first_order: bool | None = None) -> InnerLoop:
        """The inner loop at meta-test: the test rule ("same": the training inner rule; "gd") and step count."""
        rule = self.inner_rule if self.test_rule == "same" else make_rule("gd")
        return replace(self.inner, steps=steps or self.test_inner_steps, rule=rule,
                       first_order=self.first_order if first_order is None else first_order)

    def _theta(self) -> dict[str, Tensor]:
        """θ and the learned step sizes (keyed by :func:`~metasam.meta.functional.learned_lr_key`), detached."""
        return {n: t.detach() for n, t in self._with_inner_lrs(self.params).items()}

    def _with_inner_lrs(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries of ``params`` that are θ's, with the learned step sizes that :func:`adapt` reads: those of
        ``params`` where it holds them (keyed by :func:`~metasam.meta.functional.learned_lr_key`), else the learner's."""
        return {**{n: params[n] for n in self.names},
                **{learned_lr_key(n): params.get(learned_lr_key(n), a) for n, a in self.inner_lrs.items()}}

    def _task_mean(self, sums: list[Tensor], tasks: int) -> list[Tensor]:
        """(1/T) Σ_τ x_τ from sums over this process's ``tasks`` tasks: T = ``tasks`` for one process; with
        a reducer, one all-reduce of (sums, count) gives Σ_r Σ_{τ∈S_r} x_τ / Σ_r |S_r| on every process."""
        if self.reducer is None:
            return [s / tasks for s in sums]
        *sums, count = self.reducer.sum([*sums, sums[0].new_tensor(float(tasks))])
        return [s / count for s in sums]

    # -- adaptation and evaluation ------------------------------------------------------------------
    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None, params: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Fast weights φ_K for one task (support_x [N·K, ...]) from θ = ``params`` (default: the learner's);
        usable with ``functional_call`` or :meth:`predict`. Uses the test-time rule and step count, and the
        learned step sizes, if any (those of ``params`` where it holds them under ``learned_lr_key(name)``);
        differentiable w.r.t. θ (and α) unless the learner is first order."""
        phi = adapt(self.model, self._with_inner_lrs(params or self.params), support_x, support_y, self.test_loop(steps))
        return {n: phi[n] for n in self.names}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits of ``x`` under fast weights ``params``, the model in its current mode (BatchNorm: the
        statistics of the batch ``x`` for metasam's BatchNorm, and for torch's in train mode or without running
        statistics)."""
        return forward(self.model, {n: params[n] for n in self.names}, x)

    def _checked(self, batch: Sequence[Tensor]) -> Sequence[Tensor]:
        """``batch`` (a task or a task batch), once its labels are known to fit the model's outputs: with the
        default cross-entropy, a model of C outputs cannot learn labels ≥ C (a 5-way Conv4 on 20-way tasks)."""
        if self.loss_fn is not nn.functional.cross_entropy:
            return batch
        if self._outputs is None:  # one forward of one support set at θ, once
            with torch.no_grad():
                self._outputs = forward(self.model, self._theta(), batch[0] if batch[1].dim() == 1 else batch[0][0]).shape[-1]
        check_labels(batch, self._outputs)
        return batch

    def task_accuracies(self, tasks, steps: int | None = None, progress: bool = False,
                        transductive: bool = True) -> list[float]:
        """Query accuracy of each task of ``tasks`` (an iterable of tasks or task batches) after
        adaptation with the test rule and steps, in order (for paired comparisons of methods).

        ``transductive``: the query set is predicted in one batch (MAML's protocol: with batch statistics, each
        prediction depends on the other queries); False predicts each query image in a batch of its own with
        the support set (:func:`~metasam.meta.functional.forward_each`, Nichol et al. 2018).

        With a reducer, each process evaluates items i ≡ rank (mod W) and every process returns the
        gathered list, in the original order: the same numbers as one process."""
        if not self.accuracy:
            raise ConfigError("this learner reports no accuracy (a loss_fn of your own): use task_losses(), or "
                              "pass accuracy=True if argmax(output) == target is meaningful")
        return self._per_task(tasks, steps, progress, lambda output, y: float(accuracy(output, y)), transductive)

    def task_losses(self, tasks, steps: int | None = None, progress: bool = False,
                    transductive: bool = True) -> list[float]:
        """The query loss (``loss_fn``) of each task after adaptation, as :meth:`task_accuracies`."""
        return self._per_task(tasks, steps, progress, lambda output, y: float(self.loss_fn(output, y)), transductive)

    def _per_task(self, tasks, steps: int | None, progress: bool, measure: Callable[[Tensor, Tensor], float],
                  transductive: bool) -> list[float]:
        from tqdm.auto import tqdm

        if isinstance(tasks, TaskBatch):  # one batch of tasks, not an iterable of them
            tasks = [tasks]
        loop = self.test_loop(steps, first_order=True)
        theta = self._theta()  # the same fast weights; no meta-gradient is needed here
        per_item: list[list[float]] = []
        for task in tqdm(tasks if self.reducer is None else self.reducer.share(tasks), desc="evaluate",
                         disable=not progress, leave=False):
            sx, sy, qx, qy = self._checked(task)
            if sy.dim() == 1:
                sx, sy, qx, qy = sx.unsqueeze(0), sy.unsqueeze(0), qx.unsqueeze(0), qy.unsqueeze(0)
            with torch.no_grad():
                per_item.append([measure(self._query_logits(adapt(self.model, theta, sx[t], sy[t], loop), sx[t], qx[t],
                                                            transductive), qy[t]) for t in range(sx.shape[0])])
        if self.reducer is not None:
            per_item = self.reducer.gather(per_item)
        values = [value for item in per_item for value in item]
        if not values:
            raise ConfigError("got no tasks to evaluate: pass at least one (a TaskSet, a task, or a task batch)")
        return values

    def _query_logits(self, phi: dict[str, Tensor], support_x: Tensor, query_x: Tensor, transductive: bool) -> Tensor:
        if transductive:
            return forward(self.model, phi, query_x)
        return forward_each(self.model, phi, support_x, query_x)

    def evaluate(self, tasks, steps: int | None = None, progress: bool = False,
                 transductive: bool = True) -> tuple[float, float]:
        """Mean query accuracy over ``tasks`` after adaptation and its 95 % confidence half-width
        1.96·sd/√n (see :meth:`task_accuracies`); for a learner without accuracy, the mean query loss."""
        per_task = self.task_accuracies if self.accuracy else self.task_losses
        return mean_ci95(per_task(tasks, steps, progress, transductive))
