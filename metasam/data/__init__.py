"""Few-shot datasets and seeded episodes. Depends on nothing of metasam but :mod:`metasam.errors` and the
leaves :mod:`metasam.atomic_write` and :mod:`metasam.checkpoint` (atomic writes and checked loads of the image cache)."""

from metasam.data.base import FewShotDataset, check_disjoint
from metasam.data.episodes import EpisodeSampler, Task, TaskBatch, TaskSpec, collate_tasks
from metasam.data.folder import ImageFolderClasses
from metasam.data.glyphs import Glyphs
from metasam.data.miniimagenet import MiniImageNet
from metasam.data.omniglot import Omniglot, character_split
from metasam.data.taskset import TaskSet

__all__ = [
    "EpisodeSampler",
    "FewShotDataset",
    "Glyphs",
    "ImageFolderClasses",
    "MiniImageNet",
    "Omniglot",
    "Task",
    "TaskBatch",
    "TaskSet",
    "TaskSpec",
    "character_split",
    "check_disjoint",
    "collate_tasks",
]
