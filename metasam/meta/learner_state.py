"""How a :class:`~metasam.meta.MetaLearner` is saved and restored: its state dict (weights, learned inner step
sizes, outer optimizer and scheduler, outer momentum, iteration) and its rebuilding from a checkpoint ``metasam train`` wrote
(``{"model": {"name", "kwargs"}, "hparams": constructor arguments, "learner": state dict}``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metasam.checkpoint import load_checkpoint, state_dict_mismatch
from metasam.errors import CheckpointError
from metasam.meta.arguments import custom_spec
from metasam.meta.rules import rule_spec
from metasam.models import MODELS

if TYPE_CHECKING:
    from metasam.meta.learner import MetaLearner


def constructor_record(learner: MetaLearner, **given: Any) -> dict[str, Any]:
    """The constructor arguments :func:`from_checkpoint` rebuilds ``learner`` from (its ``hparams``): the settings
    as given (None where the preset's default applies), the rules as specs, and the callables a checkpoint cannot
    hold named by :func:`~metasam.meta.arguments.custom_spec`, so that loading asks for them."""
    optimizer = given.pop("outer_optimizer")
    record = {
        "algo": learner.algo, "inner_lr": learner.inner_lr, "learn_inner_lr": bool(learner.inner_lrs),
        "inner_steps": learner.inner_steps, "test_rule": learner.test_rule,
        "test_inner_steps": given.pop("test_inner_steps"), "first_order": given.pop("first_order"),
        "outer_lr": given.pop("outer_lr"), "outer_kwargs": dict(given.pop("outer_kwargs") or {}),
        "outer_optimizer": optimizer.__name__ if getattr(torch.optim, optimizer.__name__, None) is optimizer else custom_spec(optimizer),
        "accuracy": learner.accuracy, "allow_running_stats": given.pop("allow_running_stats"),
        "adapt": None if learner.inner.adapted is None else list(learner.inner.adapted),
        "inner_rule": rule_spec(learner.inner_rule), "outer_rule": rule_spec(learner.outer_rule),
    }
    view = learner.val_view  # metasam's views rebuild from their spec; one of your own is named, and asked for
    if view is not None:
        record["val_view"] = dict(view.spec) if isinstance(getattr(view, "spec", None), dict) else custom_spec(view)
    record.update({name: custom_spec(value) for name, value in given.items() if value is not None})  # loss_fn, scheduler
    return record


def state_dict(learner: MetaLearner) -> dict[str, Any]:
    """Weights, learned inner step sizes (None without), outer optimizer (and scheduler), the agnostic outer
    momentum and the iteration."""
    return {
        "model": learner.model.state_dict(),
        "inner_lrs": {n: a.detach().clone() for n, a in learner.inner_lrs.items()} if learner.inner_lrs else None,
        "outer_optimizer": learner.outer_optimizer.state_dict(),
        "outer_scheduler": None if learner.outer_scheduler is None else learner.outer_scheduler.state_dict(),
        "outer_momentum": learner.outer_momentum,
        "iteration": learner.iteration,
    }


def load(cls: type[MetaLearner], run_dir_or_checkpoint: str | Path, which: str = "best", **overrides: Any) -> MetaLearner:
    """``cls`` rebuilt from a run folder (its ``{which}.pt``) or a checkpoint file, read with ``weights_only=True``."""
    path = Path(run_dir_or_checkpoint)
    if path.is_dir():
        path = path / f"{which}.pt"
    return from_checkpoint(cls, load_checkpoint(path), path, **overrides)


def from_checkpoint(cls: type[MetaLearner], ckpt: dict[str, Any], source: str | Path = "the checkpoint",
                    **overrides: Any) -> MetaLearner:
    """``cls(model, **hparams)`` with the state of a checkpoint already read; ``source`` names it in errors.
    ``overrides["model"]``, when given, is the module the weights load into instead of the recorded model."""
    model = overrides.pop("model", None)
    try:
        hparams, state = dict(ckpt["hparams"]), ckpt["learner"]
        if model is None:
            model = MODELS[ckpt["model"]["name"]](**ckpt["model"]["kwargs"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{source} is not a metasam meta-learning checkpoint (missing {exc})") from exc
    learner = cls(model, **{**hparams, **overrides})  # a bad override is the caller's error, not the file's
    load_state_dict(learner, state, source)
    return learner


def load_state_dict(learner: MetaLearner, state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
    """Restore :func:`state_dict`'s output into ``learner``; raises :class:`CheckpointError` naming what does not
    fit, and leaves the learner unchanged in that case."""
    keys = ("model", "outer_optimizer", "outer_momentum", "iteration")
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{source} holds no learner state (missing {missing})")
    mismatch = state_dict_mismatch(state["model"], learner.model.state_dict())
    if mismatch:
        raise CheckpointError(f"{source} was written for another model: {mismatch}")
    inner_lrs = state.get("inner_lrs")  # absent from checkpoints written before learn_inner_lr existed
    saved, wanted = sorted(inner_lrs or {}), sorted(learner.inner_lrs)
    if saved != wanted:
        raise CheckpointError(
            f"{source} holds learned inner step sizes for {_parameters(saved)} and this learner learns them for "
            f"{_parameters(wanted)}: pass the same learn_inner_lr= (and adapt=) as the run that wrote it")
    misshapen = [n for n in saved if tuple(inner_lrs[n].shape) != tuple(learner.inner_lrs[n].shape)]
    if misshapen:
        raise CheckpointError(f"{source}: the learned inner step size of {misshapen[0]} has shape "
                              f"{tuple(inner_lrs[misshapen[0]].shape)}, not its parameter's; the file is damaged")
    scheduler = state.get("outer_scheduler")
    if (scheduler is None) != (learner.outer_scheduler is None):
        raise CheckpointError(
            f"{source} was written {'with' if scheduler is not None else 'without'} an outer learning-rate scheduler "
            f"and this learner has {'none' if learner.outer_scheduler is None else 'one'}: pass the same outer_scheduler= "
            "as the run that wrote it"
        )
    momentum = state["outer_momentum"]
    if momentum is not None and [tuple(m.shape) for m in momentum] != [tuple(learner.meta_params[n].shape) for n in learner.meta_names]:
        raise CheckpointError(f"{source}: its outer momentum does not match this model's parameters; load it into "
                              "the architecture that wrote it")
    try:
        learner.outer_optimizer.load_state_dict(state["outer_optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{source}: its outer optimizer state does not fit this learner ({exc}); was it written by another "
            "outer optimizer or model?"
        ) from exc
    learner.model.load_state_dict(state["model"])
    with torch.no_grad():
        for n, a in (inner_lrs or {}).items():
            learner.inner_lrs[n].copy_(a)
    if scheduler is not None:
        learner.outer_scheduler.load_state_dict(scheduler)
    learner.outer_momentum = momentum
    learner.iteration = int(state["iteration"])


def _parameters(names: list[str]) -> str:
    return "none of its parameters" if not names else f"{len(names)} parameters ({names[0]}{', ...' if len(names) > 1 else ''})"
