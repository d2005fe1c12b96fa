"""The bilevel math as functions of a parameter dict: forward, adapt, task loss, meta-gradient.

Parameters are a dict (name → tensor, as ``model.named_parameters()`` gives them) and the model runs
through ``torch.func.functional_call``, so nothing here writes the model. With φ_0 = θ (docs/algorithms.md §3):

    φ_k = φ_{k−1} − α · d_k,  d_k from the inner rule on the support loss L_s   (:func:`adapt`)
    φ_k = φ_{k−1} − α ⊙ d_k,  α learned per entry beside θ (Meta-SGD)            (:func:`learned_lr_key`)
    L_q^τ(φ_K^τ(θ))                                                              (:func:`task_loss`)
    ∇_θ L_meta = (1/T) Σ_τ ∇_θ L_q^τ(φ_K^τ(θ))          (:func:`meta_gradient_loop`, :func:`meta_gradient_vmap`)

The inner loop keeps the graph of its gradients unless first order, so the second-order meta-gradient is
the plain gradient of the post-adaptation query loss. :class:`~metasam.meta.MetaLearner` is the stateful
layer over these functions (outer optimizer, outer rule, checkpoints).
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metasam.core import cosine_similarity
from metasam.data.episodes import TaskBatch
from metasam.errors import ConfigError
from metasam.meta.rules import GradFn, Rule

LossFn = Callable[[Tensor, Tensor], Tensor]
"""(model output, target) → a scalar loss, differentiable in the output."""
ValView = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(support x, support y) → (x', y'): the agnostic inner rule's validation view of a support set."""
GradMaker = Callable[[Callable[[Sequence[Tensor]], Tensor]], GradFn]
"""Turns a loss function of parameter values into its gradient function."""
Params = Mapping[str, Tensor]
LEARNED_LR = "inner_lr:"
"""The prefix of a learned step size's key in a parameter dict (see :func:`learned_lr_key`)."""


def learned_lr_key(name: str) -> str:
    """The key of parameter ``name``'s learned inner step size in a parameter dict: Meta-SGD (Li et al. 2017).

    Where ``params[learned_lr_key(name)]`` exists (a tensor of the parameter's shape), :func:`adapt` steps
    that parameter by φ ← φ − α ⊙ d with it, elementwise, instead of the scalar ``InnerLoop.inner_lr``; it is
    then a meta-parameter like θ, and every meta-gradient here differentiates it too (for K = 1,
    ∂L_q(φ_1)/∂α = −∇L_q(φ_1) ⊙ d_1). :func:`forward` leaves these keys out of the model's call."""
    return LEARNED_LR + name


def is_learned_lr(key: str) -> bool:
    """Whether ``key`` of a parameter dict is a learned step size (:func:`learned_lr_key`), not the model's."""
    return key.startswith(LEARNED_LR)


@dataclass(frozen=True)
class InnerLoop:
    """How one task adapts: K = ``steps`` steps φ ← φ − α·d of ``rule`` on ``loss_fn`` over the support set.

    ``inner_lr``: α. ``first_order``: the inner gradients are constants of θ (FOMAML); the fast weights
    are the same. ``adapted``: the names of the parameters that adapt (None: all); the others stay θ.
    ``val_view``: the agnostic rule's validation view of the support set (None: the support set itself).
    """

    inner_lr: float
    steps: int
    rule: Rule = Rule()
    first_order: bool = False
    loss_fn: LossFn = nn.functional.cross_entropy
    adapted: tuple[str, ...] | None = None
    val_view: ValView | None = None


class MetaGradient(NamedTuple):
    """∇_θ L_meta (keyed like the parameters), the post-adaptation query loss and accuracy, each the mean
    (or the sum, ``reduction="sum"``) over the tasks; accuracy is NaN where not measured."""

    grads: dict[str, Tensor]
    loss: Tensor
    accuracy: Tensor


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


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """model(x) with the parameters ``params`` (learned step sizes, :func:`learned_lr_key`, are not the model's
    and are left out). The model's buffers are passed as copies, so a layer that writes its buffers (running
    statistics) never changes the model."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    weights = {n: t for n, t in params.items() if not is_learned_lr(n)}
    return functional_call(model, {**weights, **buffers}, (x,))


def forward_each(model: nn.Module, params: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
    """The logits [Q, ...] of the query images (query_x [Q, ...], one task's), each predicted in a batch of its
    own with the support set (support_x [N·K, ...]): row i is model([support_x; x_i])[-1]. With batch statistics
    (BatchNorm), no query's prediction then depends on the other queries: the non-transductive evaluation of
    Nichol et al. (2018), where :func:`forward` on the whole query set is MAML's transductive one. One forward of
    N·K + 1 images per query."""
    if query_x.shape[1:] != support_x.shape[1:]:
        raise ConfigError(f"forward_each takes one task's support and query examples of one shape, got support "
                          f"{tuple(support_x.shape)} and query {tuple(query_x.shape)}; for a task batch, call it per task")
    if len(query_x) == 0:
        return forward(model, params, query_x)
    return torch.cat([forward(model, params, torch.cat([support_x, x[None]]))[-1:] for x in query_x])


def adapt(
    model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, inner: InnerLoop,
    grad_of: GradMaker | None = None, visit: Callable[[dict[str, Tensor], dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """φ_K from φ_0 = θ = ``params`` by ``inner``'s K steps on the support set (support_x [N·K, ...]).

    ``grad_of`` turns a loss function into its gradient function: :func:`autograd_grad` (the default,
    keeping the graph unless first order) or ``torch.func.grad`` (composes with vmap and jvp).
    ``visit(φ_{k−1}, φ_k)`` is called after each step. Differentiable in θ unless first order (the
    parameters that do not adapt enter the support loss detached then). A parameter with a learned step size
    in ``params`` (:func:`learned_lr_key`) steps by it, elementwise; it is never detached, so that first order
    still learns it."""
    grad_of = grad_of or autograd_grad(create_graph=not inner.first_order)
    names = [n for n in params if not is_learned_lr(n) and (inner.adapted is None or n in inner.adapted)]
    fixed = {n: t.detach() for n, t in params.items()} if inner.first_order else dict(params)
    step_size = [params.get(learned_lr_key(n), inner.inner_lr) for n in names]

    def support_loss(x: Tensor, y: Tensor) -> Callable[[Sequence[Tensor]], Tensor]:
        return lambda values: inner.loss_fn(forward(model, {**fixed, **dict(zip(names, values))}, x), y)

    grad_s = grad_of(support_loss(support_x, support_y))
    grad_v = None
    if inner.val_view is not None and inner.rule.name == "agnostic":
        grad_v = grad_of(support_loss(*inner.val_view(support_x, support_y)))
    phi, state = [params[n] for n in names], None
    for _ in range(inner.steps):
        base = [p.detach() for p in phi] if inner.first_order else phi
        d, state, _ = inner.rule.direction(grad_s, base, state, grad_v)
        previous, phi = phi, [p - lr * g for p, lr, g in zip(phi, step_size, d)]
        if visit is not None:
            visit({**fixed, **dict(zip(names, previous))}, {**fixed, **dict(zip(names, phi))})
    return {**params, **dict(zip(names, phi))}


def accuracy(output: Tensor, y: Tensor) -> Tensor:
    """mean(argmax(output) == y), detached."""
    return (output.argmax(-1) == y).float().mean().detach()


def task_loss(
    model: nn.Module, params: Params, task: Sequence[Tensor], inner: InnerLoop, grad_of: GradMaker | None = None,
) -> tuple[Tensor, Tensor]:
    """(L_q(φ_K(θ)), the model's output on the query set at φ_K) for one task (support_x, support_y,
    query_x, query_y); the loss is differentiable in θ through the adaptation."""
    support_x, support_y, query_x, query_y = task
    output = forward(model, adapt(model, params, support_x, support_y, inner, grad_of), query_x)
    return inner.loss_fn(output, query_y), output


def task_alignment(
    model: nn.Module, params: Params, task: Sequence[Tensor], inner: InnerLoop,
) -> tuple[list[Tensor], list[Tensor]]:
    """For k = 1..K of one task's adaptation: cos(∇L_s(φ_{k−1}), ∇L_q(φ_{k−1})) and cos(∇L_s(φ_k), ∇L_q(φ_k)),
    support against query gradient before and after each inner step (the fast weights of the first-order loop)."""
    support_x, support_y, query_x, query_y = task
    grad_of = autograd_grad(create_graph=False)
    names = [n for n in params if not is_learned_lr(n)]
    grad_s, grad_q = (grad_of(lambda v, x=x, y=y: inner.loss_fn(forward(model, dict(zip(names, v)), x), y))
                      for x, y in ((support_x, support_y), (query_x, query_y)))
    before: list[Tensor] = []
    after: list[Tensor] = []

    def visit(previous: dict[str, Tensor], phi: dict[str, Tensor]) -> None:
        for at, cosines in (([previous[n] for n in names], before), ([phi[n] for n in names], after)):
            cosines.append(cosine_similarity(grad_s(at), grad_q(at)))

    with torch.no_grad():
        adapt(model, params, support_x, support_y, replace(inner, first_order=True), grad_of, visit)
    return before, after


def _loss_and_metrics(model, params, task, inner, grad_of, measure_accuracy):
    loss, output = task_loss(model, params, task, inner, grad_of)
    acc = accuracy(output, task[3]) if measure_accuracy else output.new_full((), float("nan"))
    return loss, (loss.detach(), acc)


def meta_gradient_loop(
    model: nn.Module, params: Params, batch: TaskBatch, inner: InnerLoop, measure_accuracy: bool = True,
    reduction: str = "mean",
) -> MetaGradient:
    """∇_θ (1/T) Σ_τ L_q^τ(φ_K^τ(θ)) over the T tasks of ``batch``, one task at a time with
    ``torch.autograd`` (least memory). The sum over tasks accumulates in task order."""
    terms = [_task_terms(model, params, task, inner, measure_accuracy) for task in zip(*batch)]
    return _reduce(list(params), terms, reduction)


def meta_gradient_threads(
    copies: Sequence[nn.Module], params: Params, batch: TaskBatch, inner: InnerLoop, measure_accuracy: bool = True,
    reduction: str = "mean", pool: ThreadPoolExecutor | None = None,
) -> MetaGradient:
    """:func:`meta_gradient_loop` with the tasks shared among ``len(copies)`` threads, for CPUs where one task's
    small operations leave cores idle: thread w runs on ``copies[w]`` (one copy of the model per thread, from
    :func:`thread_copies`: ``functional_call`` cannot run one module in two threads at once) and takes the next
    task not yet taken whenever it finishes one, so a thread that the machine slows down does not hold up the
    others at the end. Each thread sets torch's intra-op threads to 1 for itself (torch's count is per thread,
    so a pool's warm thread would otherwise keep the count it started with), and the caller's count is
    restored after the call. A task's terms do not depend on the thread that computed them, and the sum over
    tasks is taken in task order, as the loop's; the values differ from it by rounding only. ``pool``: an
    executor of at least ``len(copies)`` threads to reuse across calls (threads that stay warm are faster than
    new ones); None makes one for this call."""
    tasks = list(zip(*batch))
    untaken: queue.SimpleQueue[int] = queue.SimpleQueue()  # the indices of the tasks no thread has taken yet
    for i in range(len(tasks)):
        untaken.put(i)

    def work(w: int) -> list[tuple[int, list[Tensor]]]:
        torch.set_num_threads(1)  # torch's count is per thread: a pool's thread keeps the one it started with
        done = []
        while True:
            try:
                i = untaken.get_nowait()
            except queue.Empty:
                return done
            done.append((i, _task_terms(copies[w], params, tasks[i], inner, measure_accuracy)))

    intra_op = torch.get_num_threads()
    own = pool is None
    pool = ThreadPoolExecutor(len(copies)) if own else pool
    try:
        terms = dict(item for done in pool.map(work, range(len(copies))) for item in done)
    finally:
        torch.set_num_threads(intra_op)
        if own:
            pool.shutdown()
    return _reduce(list(params), [terms[i] for i in range(len(tasks))], reduction)


def thread_copies(model: nn.Module, n: int) -> list[nn.Module]:
    """``n`` copies of ``model`` as it is now, for :func:`meta_gradient_threads`: the module structure is copied,
    its parameters and buffers are ``model``'s own tensors (the parameter dict replaces the parameters anyway),
    so copies made for each call carry the model's current attributes, hooks and train/eval modes.
    Raises :class:`~metasam.errors.ConfigError` naming ``task_threads=1`` when the model cannot be copied."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        return [copy.deepcopy(model, memo=dict(shared)) for _ in range(n)]
    except Exception as exc:  # whatever the model's own attributes raise when copied
        raise ConfigError(f"task threads need {n} copies of the model and copy.deepcopy fails on it "
                          f"({type(exc).__name__}: {exc}); pass task_threads=1") from exc


def _task_terms(model: nn.Module, params: Params, task: Sequence[Tensor], inner: InnerLoop, measure_accuracy: bool):
    """[∇_θ L_q(φ_K(θ)) per parameter, the query loss, the query accuracy] of one task, with torch.autograd."""
    with torch.enable_grad():
        leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
        loss, (value, acc) = _loss_and_metrics(model, leaves, task, inner, None, measure_accuracy)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [*grads, value, acc]


def meta_gradient_vmap(
    model: nn.Module, params: Params, batch: TaskBatch, inner: InnerLoop, measure_accuracy: bool = True,
    reduction: str = "mean",
) -> MetaGradient:
    """:func:`meta_gradient_loop` with all tasks at once under ``torch.func.vmap`` (inner gradients by
    ``torch.func.grad``). Exact for models whose operations have exact batching rules; torch's BatchNorm
    layers do not in second order (use :class:`metasam.models.BatchNorm`)."""
    names = list(params)

    def loss_sum(values: dict[str, Tensor]):
        task_fn = lambda p, *task: _loss_and_metrics(model, p, task, inner, grad, measure_accuracy)  # noqa: E731
        losses, aux = vmap(task_fn, in_dims=(None, 0, 0, 0, 0))(values, *batch)
        return losses.sum(), aux

    grads, (losses, accs) = grad(loss_sum, has_aux=True)({n: t.detach() for n, t in params.items()})
    total = [*(grads[n] for n in names), losses.sum(), accs.sum()]
    return _reduce(names, [total], reduction, batch.support_x.shape[0])


def _reduce(names: list[str], terms: list[list[Tensor]], reduction: str, tasks: int | None = None) -> MetaGradient:
    """Σ of ``terms`` (one list per task, or one list of sums), in order, divided by the task count for "mean"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    total = terms[0]
    for more in terms[1:]:
        total = [a + b for a, b in zip(total, more)]
    if reduction == "mean":
        total = [t / (tasks or len(terms)) for t in total]
    *grads, loss, acc = total
    return MetaGradient(dict(zip(names, grads)), loss, acc)
