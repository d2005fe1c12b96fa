"""Task batches from the layouts other meta-learning libraries hand out, without importing them.

- torchmeta's ``BatchMetaDataLoader`` yields ``{"train": (x, y), "test": (x, y)}`` with a leading task
  dimension: :func:`from_support_query_dict` turns it into a :class:`TaskBatch`.
- learn2learn's ``TaskDataset.sample()`` gives one task as ``(X, y)``, all of its examples together, labels
  0..N−1 after ``RemapLabels``: :func:`split_task` takes the first ``shots`` examples of each class as the
  support set and the rest as the query set (learn2learn's examples alternate them; any split per class is a
  valid episode), as a :class:`TaskBatch` of one task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metasam.data.episodes import TaskBatch
from metasam.errors import ConfigError


def from_support_query_dict(batch: Mapping[str, Sequence[Tensor]], support: str = "train", query: str = "test") -> TaskBatch:
    """``TaskBatch(*batch[support], *batch[query])``: torchmeta's names by default (``train`` is the support
    set, ``test`` the query set), tensors shaped [T, examples, ...] and [T, examples]."""
    missing = [k for k in (support, query) if k not in batch]
    if missing:
        raise ConfigError(f"the batch has no {missing} entry (it has {sorted(batch)}): name the support and query "
                          f"entries with support= and query=")
    (sx, sy), (qx, qy) = batch[support], batch[query]
    if sy.dim() < 2 or qy.dim() < 2:
        raise ConfigError(f"support and query targets need a leading task dimension [T, examples], got "
                          f"{tuple(sy.shape)} and {tuple(qy.shape)}: unsqueeze(0) a single task")
    return TaskBatch(sx, sy, qx, qy)


def split_task(x: Tensor, y: Tensor, shots: int) -> TaskBatch:
    """One task given as all its examples ``x`` [n, ...] with integer labels ``y`` [n] in 0..N−1: for each label,
    its first ``shots`` examples (in order) form the support set and the others the query set. Returns a
    :class:`TaskBatch` of one task, support and query ordered by label."""
    if y.dim() != 1 or y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or len(y) != len(x):
        raise ConfigError(f"split_task needs integer labels y [n] for x [n, ...], got y {tuple(y.shape)} {y.dtype} "
                          f"for x {tuple(x.shape)}")
    labels = torch.unique(y)
    support, query = [], []
    for label in labels.tolist():
        where = (y == label).nonzero().flatten()
        if len(where) <= shots:
            raise ConfigError(f"label {label} has {len(where)} examples: {shots} shots leave none for its query set; "
                              "sample the task with more examples per class")
        support.append(where[:shots])
        query.append(where[shots:])
    s, q = torch.cat(support), torch.cat(query)
    return TaskBatch(x[s].unsqueeze(0), y[s].unsqueeze(0), x[q].unsqueeze(0), y[q].unsqueeze(0))
