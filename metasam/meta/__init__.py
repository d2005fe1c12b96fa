"""The bilevel (meta-learning) loops: inner and outer rules over the optimizer core, and presets."""

from metasam.data.episodes import TaskBatch
from metasam.meta.arguments import as_task_batch
from metasam.meta.learner import MetaLearner
from metasam.meta.presets import PRESETS, Preset
from metasam.meta.rules import AgnosticRule, Rule, SAMRule, make_rule

__all__ = ["AgnosticRule", "MetaLearner", "PRESETS", "Preset", "Rule", "SAMRule", "TaskBatch", "as_task_batch", "make_rule"]
