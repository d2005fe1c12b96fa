"""Evaluating a run on fixed test tasks, and the checks that keep a diverged model from reporting a number.

A model with a NaN or Inf weight, or one whose adapted logits are not finite, predicts class 0 for every
query: its "accuracy" is exactly chance with a zero interval, a number that looks like a result. Both are
refused with an error naming the checkpoint instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metasam.atomic_write import write_text_atomic
from metasam.data import TaskSet
from metasam.errors import CheckpointError, ConfigError, NonFiniteError
from metasam.meta import MetaLearner
from metasam.stats import mean_ci95
from metasam.train.config import MetaTrainConfig, check_int
from metasam.train.distributed import join
from metasam.train.run_checkpoint import load_run_checkpoint
from metasam.train.splits import load_splits


def learner_weights(learner: MetaLearner) -> dict[str, torch.Tensor]:
    """The model's state dict and the learned inner step sizes (named "learned step size of <name>"), if any."""
    return {**learner.model.state_dict(), **{f"learned step size of {n}": a.detach() for n, a in learner.inner_lrs.items()}}


def check_finite_weights(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Raise :class:`NonFiniteError` naming the tensors of ``tensors`` (a state dict, or :func:`learner_weights`)
    that hold NaN or Inf."""
    bad = [f"{name} ({'NaN' if t.isnan().any() else 'Inf'})" for name, t in tensors.items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteError(
            f"{source} holds non-finite weights: {shown}. The run diverged or the file was edited; use another "
            "checkpoint of the run (--checkpoint last) or train again with a smaller --inner-lr / --outer-lr",
            tensor=bad[0].rsplit(" (", 1)[0])


@contextmanager
def refusing_nonfinite_outputs(model: nn.Module, source: str | Path) -> Iterator[None]:
    """Raise :class:`NonFiniteError` as soon as ``model`` (called directly or through ``functional_call``)
    returns a NaN or Inf, e.g. in an adaptation whose inner steps diverge from finite weights."""
    def check(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not bool(torch.isfinite(output).all()):
            raise NonFiniteError(
                f"the logits of {source} become NaN/Inf during adaptation (its weights are finite): the inner steps "
                "diverge, and every prediction would be class 0. Evaluate with fewer --test-inner-steps, or train again with a "
                "smaller --inner-lr", tensor="logits")

    handle = model.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


def evaluate_run(run_dir: str | Path, episodes: int = 600, seed: int = 1234, which: str = "best",
                 test_split: str | None = None, test_inner_steps: int | None = None, progress: bool = True,
                 test_rule: str | None = None, transductive: bool = True) -> dict[str, Any]:
    """Mean accuracy ± 95 % CI of a run's ``which`` checkpoint on a fixed seeded TaskSet of the test split;
    also written to ``RUN_DIR/eval_<which>_<episodes>_seed<seed>.json``, a name that says which of the run's
    test settings ``test_split``, ``test_inner_steps`` and ``test_rule`` override, and whether the queries were
    predicted one by one (``transductive`` False, :meth:`~metasam.meta.MetaLearner.task_accuracies`;
    :func:`eval_file_name`). Non-finite weights or logits raise :class:`NonFiniteError`."""
    run_dir = Path(run_dir)
    cfg = MetaTrainConfig.load(run_dir)
    split = test_split or cfg.test_split
    if not split:
        raise ConfigError("the run has no test split; pass --test-split")
    check_int("episodes", episodes)
    if test_inner_steps is not None:
        check_int("test_inner_steps", test_inner_steps)
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.exists() and (run_dir / "last.pt").exists():
        raise CheckpointError(f"{path} does not exist: the run has not validated yet; evaluate its last checkpoint with "
                              "--checkpoint last (which='last' in Python), or train it further")
    procs = join("cpu")  # under torchrun the processes share the tasks
    rule = test_rule or cfg.test_rule
    ckpt = load_run_checkpoint(path, cfg)
    learner = MetaLearner.from_checkpoint(ckpt, path, reducer=procs.reducer, val_view=cfg.validation_view(), test_rule=rule)
    check_finite_weights(learner_weights(learner), path)
    _, _, test_ds = load_splits(cfg.dataset, cfg.data_root, cfg.train_split, cfg.val_split, split, cfg.image_size)
    tasks = TaskSet.sample(test_ds, episodes, cfg.ways, cfg.shots, cfg.queries, seed=seed)
    with refusing_nonfinite_outputs(learner.model, path):
        accuracies = learner.task_accuracies(tasks, steps=test_inner_steps, progress=progress and procs.is_main,
                                             transductive=transductive)
    mean, ci = mean_ci95(accuracies)
    result = {"run": str(run_dir), "checkpoint": which, "algo": cfg.algo, "test_split": split, "episodes": episodes,
              "seed": seed, "ways": cfg.ways, "shots": cfg.shots, "test_inner_steps": test_inner_steps or cfg.test_inner_steps,
              "test_rule": rule, "transductive": transductive, "best_iteration": ckpt["best_iteration"],
              "accuracy": mean, "ci95": ci,
              "task_accuracies": accuracies}
    if procs.is_main:
        name = eval_file_name(which, episodes, seed, cfg, rule, test_inner_steps, split, transductive)
        write_text_atomic(json.dumps(result, indent=2), run_dir / name)
    return result


def eval_file_name(which: str, episodes: int, seed: int, cfg: MetaTrainConfig, test_rule: str | None = None,
                   test_inner_steps: int | None = None, test_split: str | None = None, transductive: bool = True) -> str:
    """Where :func:`evaluate_run` writes its result in the run folder: ``eval_best_600_seed1234.json`` for the
    run's own test setting. Each override of it adds to the name, before ``.json``: ``_<test_rule>`` for
    another test rule, ``_steps<K>`` for another number of test inner steps, ``_split-<8 hex digits>`` (of the
    split's SHA-256; the file records the split) for another test split, ``_nontransductive`` for queries
    predicted one by one. So evaluations of the same weights under different settings never overwrite one
    another."""
    name = f"eval_{which}_{episodes}_seed{seed}"
    if test_rule is not None and test_rule != cfg.test_rule:
        name += f"_{test_rule}"
    if test_inner_steps is not None and test_inner_steps != cfg.test_inner_steps:
        name += f"_steps{test_inner_steps}"
    if test_split is not None and test_split != cfg.test_split:
        name += f"_split-{hashlib.sha256(test_split.encode()).hexdigest()[:8]}"
    if not transductive:
        name += "_nontransductive"
    return name + ".json"
