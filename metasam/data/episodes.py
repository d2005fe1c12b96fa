"""Seeded N-way K-shot episodes.

Determinism contract: task ``i`` of ``EpisodeSampler(dataset, ways, shots, queries, seed)`` depends only on
(seed, i), the dataset's classes and images (in their order) and (ways, shots, queries); not on the
process, the number of DataLoader workers, the order tasks are requested in, or the library versions.
Draws come from :class:`~metasam.data._rng.StableRandom` seeded with ``SeedSequence([seed, i])``:
1. ``ways`` classes without replacement (partial Fisher–Yates over the class indices);
2. for each drawn class in that order, ``shots + queries`` distinct images (the first ``shots`` are the
   support set, the rest the query set);
3. a random permutation gives each drawn class its label in 0..ways−1.
Support and query tensors are ordered by label, then by draw: ``support_y = [0]*shots + [1]*shots + …``.
"""

from __future__ import annotations

import operator
from typing import Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import Dataset

from metasam.data._checks import check_int
from metasam.data._rng import StableRandom
from metasam.data.base import FewShotDataset, as_few_shot, check_disjoint
from metasam.errors import ConfigError, DatasetError


class Task(NamedTuple):
    """One episode: ``support_x`` [ways·shots, C, H, W], ``support_y`` [ways·shots] (int64), and the query pair
    [ways·queries, C, H, W], [ways·queries]."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


class TaskBatch(NamedTuple):
    """T episodes stacked: ``support_x`` [T, ways·shots, C, H, W], ``support_y`` [T, ways·shots], and the
    query counterparts."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


class TaskSpec(NamedTuple):
    """Which images make a task: ``classes[label]`` is a class index; ``support[label]`` / ``query[label]``
    are that class's image indices."""

    classes: tuple[int, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]


def collate_tasks(tasks: Sequence[Task]) -> TaskBatch:
    """Stack tasks along a new leading dimension (use as a DataLoader's ``collate_fn``)."""
    if not tasks:
        raise ConfigError("cannot collate an empty list of tasks")
    return TaskBatch(*(torch.stack(parts) for parts in zip(*tasks)))


def build_task(dataset: FewShotDataset, spec: TaskSpec) -> Task:
    """The tensors of a task from its spec (images gathered with one indexing operation per set)."""
    support = [i for ix in spec.support for i in ix]
    query = [i for ix in spec.query for i in ix]
    ways = len(spec.classes)
    shots = len(spec.support[0]) if ways else 0
    queries = len(spec.query[0]) if ways else 0
    labels = torch.arange(ways, dtype=torch.int64)
    return Task(
        dataset.stack(support),
        labels.repeat_interleave(shots),
        dataset.stack(query),
        labels.repeat_interleave(queries),
    )


def check_episode_shape(dataset: FewShotDataset, ways: int, shots: int, queries: int) -> None:
    """Raise a clear error unless every task of this shape can be drawn from ``dataset``."""
    for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
        check_int(name, value, low)
    if len(dataset.classes) < ways:
        raise DatasetError(
            f"{dataset.name} has {len(dataset.classes)} classes, fewer than ways={ways}; "
            f"lower ways (--ways) or use a split with more classes"
        )
    need = shots + queries
    small = [(n, c) for c, n in zip(dataset.classes, dataset.class_sizes()) if n < need]
    if small:
        n, c = min(small)
        raise DatasetError(
            f"class {c!r} of {dataset.name} has {n} images, fewer than shots + queries = {need} "
            f"({len(small)} class(es) are too small); lower shots/queries (--shots/--queries), use a split whose classes "
            "have more images, or drop the small classes with dataset.subset() in Python"
        )


class EpisodeSampler(Dataset):
    """Task ``i`` (a :class:`Task`) is a pure function of (seed, i); see the module docstring.

    A map-style ``torch.utils.data.Dataset`` of ``num_tasks`` tasks, so ``DataLoader(sampler,
    batch_size=T, collate_fn=collate_tasks, num_workers=k)`` yields the same :class:`TaskBatch` es for any k.
    Indices beyond ``num_tasks`` are valid too (``sampler[10**9]``); ``num_tasks`` only bounds iteration.

    ``dataset``: a :class:`FewShotDataset`, or any indexable dataset of ``(x, y)`` pairs with integer labels
    (a ``TensorDataset``, feature vectors, images of any dtype), read once into memory (:func:`as_few_shot`).
    ``disjoint_from``: datasets (e.g. the training split) that must share no source class with ``dataset``.
    """

    def __init__(
        self,
        dataset: FewShotDataset | Dataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        *,
        num_tasks: int = 10_000,
        disjoint_from: Sequence[FewShotDataset] = (),
    ) -> None:
        dataset = as_few_shot(dataset)
        check_episode_shape(dataset, ways, shots, queries)
        check_int("seed", seed, 0)
        check_int("num_tasks", num_tasks, 0)
        check_disjoint(dataset, *(as_few_shot(d) for d in disjoint_from))
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.seed, self.num_tasks = seed, num_tasks

    def spec(self, index: int) -> TaskSpec:
        """The class and image indices of task ``index`` (no pixels)."""
        try:
            index = operator.index(index)
        except TypeError:
            raise IndexError(f"task index must be an int, got {index!r}") from None
        if index < 0:
            raise IndexError(f"task index must be non-negative, got {index}")
        rng = StableRandom(self.seed, index)
        drawn = rng.sample(len(self.dataset.classes), self.ways)
        per_class = []
        for c in drawn:
            pool = self.dataset.images_of(c).tolist()
            picks = [pool[j] for j in rng.sample(len(pool), self.shots + self.queries)]
            per_class.append(picks)
        labels = rng.sample(self.ways, self.ways)  # labels[j] = label of the j-th drawn class
        by_label = sorted(range(self.ways), key=lambda j: labels[j])
        return TaskSpec(
            tuple(drawn[j] for j in by_label),
            tuple(tuple(per_class[j][: self.shots]) for j in by_label),
            tuple(tuple(per_class[j][self.shots:]) for j in by_label),
        )

    def __getitem__(self, index: int) -> Task:
        return build_task(self.dataset, self.spec(index))

    def __len__(self) -> int:
        return self.num_tasks

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(self.num_tasks))

    def batch(self, indices: Sequence[int]) -> TaskBatch:
        """Tasks ``indices`` stacked into a :class:`TaskBatch`."""
        return collate_tasks([self[i] for i in indices])

    def __repr__(self) -> str:
        return (f"EpisodeSampler({self.dataset!r}, ways={self.ways}, shots={self.shots}, "
                f"queries={self.queries}, seed={self.seed})")
