"""A fixed, saved list of evaluation tasks, so every method is scored on exactly the same episodes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from metasam.atomic_write import write_text_atomic
from metasam.data.base import FewShotDataset
from metasam.data.episodes import EpisodeSampler, Task, TaskBatch, TaskSpec, build_task, collate_tasks
from metasam.errors import ConfigError, DatasetError

FORMAT = "metasam.taskset"
VERSION = 1


class TaskSet:
    """Tasks given by class names and image file ids (never pixels), bound to a dataset.

    The JSON file records, per task and label, the class name and the file ids of its support and query
    images; :meth:`load` finds them again in a dataset by (class name, file id), so it works whatever
    order the dataset lists its images in, and fails loudly when an image or class is missing.
    """

    def __init__(self, dataset: FewShotDataset, specs: Sequence[TaskSpec], *, seed: int | None = None) -> None:
        if not specs:
            raise ConfigError("a TaskSet needs at least one task: sample n >= 1 tasks")
        shapes = {(len(s.classes), len(s.support[0]), len(s.query[0])) for s in specs}
        if len(shapes) != 1:
            raise DatasetError(f"TaskSet tasks differ in (ways, shots, queries): {sorted(shapes)}; build one TaskSet "
                               "per shape")
        self.dataset = dataset
        self.specs = list(specs)
        self.ways, self.shots, self.queries = shapes.pop()
        self.seed = seed

    @classmethod
    def sample(cls, dataset: FewShotDataset, n: int, ways: int, shots: int, queries: int, seed: int = 0) -> "TaskSet":
        """Tasks 0..n−1 of ``EpisodeSampler(dataset, ways, shots, queries, seed)``."""
        sampler = EpisodeSampler(dataset, ways, shots, queries, seed, num_tasks=n)
        return cls(dataset, [sampler.spec(i) for i in range(n)], seed=seed)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> Task:
        return build_task(self.dataset, self.specs[index])

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    def batch(self, indices: Sequence[int]) -> TaskBatch:
        """The tasks at ``indices`` stacked into one batch, as :meth:`EpisodeSampler.batch` gives them."""
        return collate_tasks([self[i] for i in indices])

    # --- files --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The task set as plain data: each task's class names and the file ids of its support and query
        images, so that the same tasks load again from another copy of the dataset."""
        ds = self.dataset
        return {
            "format": FORMAT,
            "version": VERSION,
            "dataset": ds.name,
            "ways": self.ways, "shots": self.shots, "queries": self.queries, "seed": self.seed,
            "tasks": [
                {
                    "classes": [ds.classes[c] for c in spec.classes],
                    "support": [[ds.file_ids[i] for i in ix] for ix in spec.support],
                    "query": [[ds.file_ids[i] for i in ix] for ix in spec.query],
                }
                for spec in self.specs
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the task set as JSON, atomically (a crash leaves the old file or the new one, never half)."""
        write_text_atomic(json.dumps(self.to_json(), indent=1), path)

    @classmethod
    def load(cls, path: str | os.PathLike, dataset: FewShotDataset) -> "TaskSet":
        """The task set :meth:`save` wrote, its classes and images looked up in ``dataset`` by name; a file
        that is not a metasam task set, or names what ``dataset`` lacks, raises :class:`DatasetError`."""
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DatasetError(f"task set file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"task set file {path} is not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise DatasetError(f"{path} is not a metasam task set (format {FORMAT!r} version {VERSION})")
        return cls(dataset, [_resolve(dataset, task, path, k) for k, task in enumerate(doc["tasks"])], seed=doc.get("seed"))


def _resolve(dataset: FewShotDataset, task: dict, path, k: int) -> TaskSpec:
    class_index = {name: i for i, name in enumerate(dataset.classes)}
    classes, support, query = [], [], []
    for name, sup, qry in zip(task["classes"], task["support"], task["query"], strict=True):
        if name not in class_index:
            raise DatasetError(f"{path}: task {k} uses class {name!r}, which {dataset.name} does not have; "
                               "load the task set with the dataset (and split) it was sampled from")
        c = class_index[name]
        by_id = {dataset.file_ids[i]: i for i in dataset.images_of(c).tolist()}
        ids = []
        for fid in [*sup, *qry]:
            if fid not in by_id:
                raise DatasetError(f"{path}: task {k} uses image {fid!r} of class {name!r}, missing from {dataset.name}")
            ids.append(by_id[fid])
        classes.append(c)
        support.append(tuple(ids[: len(sup)]))
        query.append(tuple(ids[len(sup):]))
    return TaskSpec(tuple(classes), tuple(support), tuple(query))
