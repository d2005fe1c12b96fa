"""metasam: sharpness-aware meta-learning (SAM, ASAM, Agnostic-SAM; MAML and Sharp-MAML) in PyTorch."""

from metasam.core import agnostic_perturbation, cosine_similarity, global_norm, momentum_update, sam_perturbation
from metasam.errors import CheckpointError, ConfigError, DatasetError, MetaSAMError, NonFiniteError
from metasam.optim import SAM, AgnosticSAM, preserve_bn_stats
from metasam.data import (
    EpisodeSampler,
    Glyphs,
    ImageFolderClasses,
    MiniImageNet,
    Omniglot,
    Task,
    TaskBatch,
    TaskSet,
)
from metasam.meta import PRESETS, AgnosticRule, MetaLearner, Rule, SAMRule
from metasam.models import BatchNorm, Conv4, CPUConv4

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AgnosticRule",
    "BatchNorm",
    "Conv4",
    "CPUConv4",
    "EpisodeSampler",
    "Glyphs",
    "ImageFolderClasses",
    "MetaLearner",
    "MiniImageNet",
    "Omniglot",
    "Rule",
    "SAMRule",
    "Task",
    "TaskBatch",
    "TaskSet",
    "SAM",
    "AgnosticSAM",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "MetaSAMError",
    "NonFiniteError",
    "agnostic_perturbation",
    "cosine_similarity",
    "global_norm",
    "momentum_update",
    "preserve_bn_stats",
    "sam_perturbation",
]
