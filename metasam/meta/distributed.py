"""Sharing a meta-batch between processes: the reductions the bilevel learner needs (docs/algorithms.md §3).

With the T tasks of a meta-batch split over W processes, process r holding the tasks S_r with
τ ≡ r (mod W), the meta-gradient is a sum of per-process sums divided by a sum of per-process counts:

    ∇L_meta(θ) = (1/T) Σ_τ ∇L_q^τ(φ_K^τ(θ)) = [Σ_r Σ_{τ∈S_r} ∇L_q^τ] / [Σ_r |S_r|]

so one all-reduce SUM of (Σ_{τ∈S_r} ∇L_q^τ, |S_r|) gives every process the same ∇L_meta, whether or not
W divides T. The outer rules need nothing else: every meta-gradient they ask for (at θ, at θ + ε, of the
validation meta-batch) is formed by the learner through :meth:`Reducer.sum`, so ε, the momentum m and
the step are the same on every process. Evaluation shares a task list the same way (item i to process
i mod W) and gathers the per-task results back in the original order.

:class:`Reducer` is what :class:`~metasam.meta.MetaLearner` calls (its ``reducer`` argument);
:class:`ProcessGroupReducer` implements it over an initialised ``torch.distributed`` process group.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Item = TypeVar("Item")


class Reducer(Protocol):
    """How the processes of a data-parallel run share tasks and combine what they computed on them."""

    def share(self, items: Iterable[Item]) -> Iterable[Item]:
        """This process's items: those at positions i ≡ rank (mod W)."""
        ...

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Σ_r x_r over the processes, tensor by tensor; every process gets the same result."""
        ...

    def gather(self, mine: list[Any]) -> list[Any]:
        """All processes' :meth:`share` results put back in the original order of the items."""
        ...


class ProcessGroupReducer:
    """:class:`Reducer` over a ``torch.distributed`` process group (the default group unless ``group``).

    The group must be initialised (``torch.distributed.init_process_group``; ``metasam train`` does it
    under torchrun). Tensors are reduced on their own device: CPU tensors need gloo, CUDA tensors NCCL.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def share(self, items: Iterable[Item]) -> Iterable[Item]:
        """Items i ≡ rank (mod W): a slice of a list, tuple or range; indexed lazily from anything with
        ``len`` and ``[]`` (a TaskSet builds only this process's tasks); otherwise every W-th item."""
        if isinstance(items, Sequence):
            return items[self.rank :: self.world_size]
        if hasattr(items, "__len__") and hasattr(items, "__getitem__"):
            return (items[i] for i in range(self.rank, len(items), self.world_size))
        return itertools.islice(items, self.rank, None, self.world_size)

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """One all-reduce SUM of all ``tensors`` packed into a single buffer (in their promoted dtype);
        returns new tensors with the shapes and dtypes of the inputs."""
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        parts = flat.split([t.numel() for t in tensors])
        return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors)]

    def gather(self, mine: list[Any]) -> list[Any]:
        """All-gather the processes' lists (picklable items) and interleave them: item i is item i // W
        of process i mod W, the inverse of :meth:`share`."""
        parts: list[list[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(parts, mine, group=self.group)
        total = sum(len(p) for p in parts)
        return [parts[i % self.world_size][i // self.world_size] for i in range(total)]
