"""The checks of :class:`~metasam.meta.MetaLearner`'s arguments, each with a message naming the fix, and the
conversions they share with the trainer (task batches, outer optimizer classes, custom callables in checkpoints)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metasam.data.episodes import TaskBatch
from metasam.errors import ConfigError, NonFiniteError
from metasam.meta.functional import LEARNED_LR, is_learned_lr
from metasam.meta.presets import PRESETS, preset_rules
from metasam.meta.rules import Rule

AdaptSelection = Sequence[str] | Callable[[str, Tensor], bool] | nn.Module
"""Which parameters adapt in the inner loop: names, a predicate (name, parameter) → bool, or a submodule."""
TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def as_task_batch(batch: Sequence[Tensor]) -> TaskBatch:
    """Accept a TaskBatch, any named tuple with those fields, or a plain 4-tuple in that order."""
    if len(batch) != 4:
        raise ConfigError(f"a task batch has 4 tensors (support_x, support_y, query_x, query_y), got {len(batch)}")
    batch = TaskBatch(*batch)
    if batch.support_x.dim() >= 1 and batch.support_x.shape[0] == 0:
        raise ConfigError(
            "the task batch holds no tasks; when processes share a meta-batch (a reducer), each needs at least "
            "one of its tasks: use a meta-batch of at least as many tasks as processes"
        )
    if batch.support_x.dim() < 2 or batch.support_y.dim() < 2:
        raise ConfigError(
            "task batch tensors need a leading task dimension: support_x [T, N*K, ...], support_y [T, N*K]; "
            f"got {tuple(batch.support_x.shape)} and {tuple(batch.support_y.shape)} (wrap one task with x.unsqueeze(0))"
        )
    return batch


def check_hparams(
    algo: str, inner_lr: float, inner_steps: int, test_inner_steps: int | None = None, outer_lr: float = 1e-3,
    test_rule: str = "same", path: str = "auto", **rule_params: Any,
) -> tuple[Rule, Rule]:
    """Check :class:`MetaLearner`'s hyperparameters without a model or data; return the preset's
    (inner, outer) rules built from ``rule_params``.

    Raises :class:`ConfigError` naming the first bad argument (α and the outer learning rate must be
    finite and > 0, step counts ints ≥ 1, radii finite and ≥ 0, ``rule_params`` those the preset's rules
    take); warns where ρ2 > ρ1. ``metasam train``'s configuration calls it (without rule settings, which
    it holds as rules) before it loads any data.
    """
    if algo not in PRESETS:
        raise ConfigError(f"unknown algo {algo!r}; choose one of {', '.join(PRESETS)}")
    for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
        if not (value is None and name == "test_inner_steps") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if test_rule not in ("same", "gd"):
        raise ConfigError(f"test_rule must be 'same' or 'gd', got {test_rule!r}")
    if path not in ("auto", "loop", "vmap"):
        raise ConfigError(f"path must be 'auto', 'loop' or 'vmap', got {path!r}")
    levels: dict[str, dict[str, Any]] = {"inner": {}, "outer": {}}
    for key, value in rule_params.items():
        level, _, setting = key.partition("_")
        if level not in levels:
            raise ConfigError(f"unknown argument {key!r}: rule settings are prefixed inner_ or outer_ (inner_rho1, outer_rho)")
        levels[level][setting] = value
    return preset_rules(algo, levels["inner"], levels["outer"])


def has_torch_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, TORCH_BATCHNORMS) for m in model.modules())


def check_labels(batch: Sequence[Tensor], outputs: int) -> None:
    """Refuse a task (batch) whose labels a model of ``outputs`` outputs cannot learn with cross-entropy."""
    labels = max(int(batch[1].max()), int(batch[3].max())) + 1
    if labels > outputs:
        raise ConfigError(f"the tasks have labels up to {labels - 1} ({labels} ways) but the model gives {outputs} "
                          f"outputs per example: build it for {labels} ways (e.g. Conv4(ways={labels}))")


def resolve_path(path: str, model: nn.Module) -> str:
    """"loop" or "vmap" for ``path`` ("auto": vmap on CUDA unless the model has torch BatchNorm layers, else the
    loop); refuses vmap with torch BatchNorm layers, whose batched backward is wrong in second order."""
    if path == "auto":
        cuda = next(model.parameters()).device.type == "cuda"
        path = "vmap" if cuda and not has_torch_batchnorm(model) else "loop"
    if path == "vmap" and has_torch_batchnorm(model):
        raise ConfigError(
            "path='vmap' with torch.nn BatchNorm layers gives a wrong second-order meta-gradient (PyTorch's "
            "batching rule for the batch-norm backward); use metasam.models.BatchNorm in the model or path='loop'"
        )
    return path


def check_task_threads(value: Any, name: str = "task_threads") -> None:
    """Refuse a task-thread setting other than "auto" or an int >= 1; ``name`` is how the caller spells it."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be 'auto' or an int >= 1, got {value!r}")


def resolve_task_threads(task_threads: int | str, path: str, model: nn.Module) -> int:
    """The number of task threads for ``task_threads`` ("auto" or an int >= 1, refused > 1 off the loop path).

    "auto" is torch's intra-op thread count (``torch.get_num_threads()``, now) on the loop path over a model on
    the CPU, and 1 elsewhere: on a GPU (one stream runs the tasks anyway), on the vmap path (it runs them
    together), and for a model with dropout layers, whose draws from the one random generator threads would
    make in no fixed order. The learner also checks every threaded call it makes under "auto" and turns to one
    thread if the model drew random numbers in another way (``MetaLearner._run_tasks``).
    """
    if task_threads == "auto":
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        random = any(isinstance(m, RANDOM_LAYERS) for m in model.modules())
        return torch.get_num_threads() if path == "loop" and on_cpu and not random else 1
    check_task_threads(task_threads)
    if task_threads > 1 and path != "loop":
        raise ConfigError(f"task_threads={task_threads} shares the tasks of the loop path; path={path!r} "
                          "runs them together: pass path='loop' or task_threads=1")
    return task_threads


def check_running_stats(model: nn.Module) -> None:
    """Refuse torch BatchNorm layers that keep running statistics: adaptation runs on copies of the buffers
    and never updates them, so after ``model.eval()`` they would normalise with stale values."""
    layers = [n for n, m in model.named_modules() if isinstance(m, TORCH_BATCHNORMS) and m.track_running_stats]
    if layers:
        raise ConfigError(
            f"BatchNorm layer(s) {layers[:3]} keep running statistics (track_running_stats=True), which meta-learning "
            "never updates, so model.eval() would normalise with their initial values: build them with "
            "track_running_stats=False (batch statistics, MAML's choice) or use metasam.models.BatchNorm, or pass "
            "allow_running_stats=True if they hold statistics you trust (a pretrained, frozen body)"
        )


def check_initialized(model: nn.Module) -> None:
    """Refuse a model with lazy layers not yet built (``nn.LazyLinear``, ``nn.LazyBatchNorm2d``, …): their
    parameters have no shape until a first forward pass, so the learner would hold no tensors to adapt or
    optimise, and a lazy batch norm's running statistics could not be checked."""
    lazy = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if isinstance(t, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))]
    if lazy:
        raise ConfigError(f"the model has lazy layers not built yet (uninitialised {', '.join(lazy[:3])}"
                          f"{', …' if len(lazy) > 3 else ''}): run one forward pass on a batch of your data, "
                          "model(x), before building the MetaLearner")


def adapted_names(model: nn.Module, names: Sequence[str], adapt: AdaptSelection | None) -> list[str]:
    """The names of the parameters that adapt in the inner loop: all of ``names`` for None; those listed; those
    for which ``adapt(name, parameter)`` is true; or those of a submodule of ``model``."""
    if adapt is None:
        return list(names)
    params = dict(model.named_parameters())
    if isinstance(adapt, nn.Module):
        owned = {id(p) for p in adapt.parameters()}
        chosen = [n for n in names if id(params[n]) in owned]
    elif callable(adapt):
        chosen = [n for n in names if adapt(n, params[n])]
    else:
        unknown = sorted(set(adapt) - set(names))
        if isinstance(adapt, str) or unknown:
            raise ConfigError(f"adapt= names {unknown or adapt!r} that are not trainable parameters of the model; "
                              f"choose among {list(names)[:6]}{' ...' if len(names) > 6 else ''}")
        chosen = [n for n in names if n in set(adapt)]
    if not chosen:
        raise ConfigError("adapt= selects no parameter: the inner loop would adapt nothing; select at least one")
    return chosen


def learned_inner_lrs(params: dict[str, Tensor], adapted: Sequence[str] | None, inner_lr: float,
                      learn: bool) -> dict[str, nn.Parameter]:
    """Meta-SGD's step sizes (``learn``): one tensor α of each adapted parameter's shape (all of ``params`` for
    None), filled with ``inner_lr``; {} without. Refuses a model whose own parameter names could be taken for
    them (``forward`` leaves such keys out of the model's call), with or without ``learn``."""
    clash = [n for n in params if is_learned_lr(n)]
    if clash:
        raise ConfigError(f"the model's parameter {clash[0]!r} is named like a learned inner step size "
                          f"({LEARNED_LR}...), which metasam keeps out of the model's call: rename it")
    return {n: nn.Parameter(torch.full_like(p.detach(), inner_lr)) for n, p in params.items()
            if learn and (adapted is None or n in adapted)}


def nonfinite_step_error(iteration: int, query_loss: Tensor, direction: dict[str, Tensor], tame: dict[str, Any]) -> NonFiniteError:
    """The error of a meta-step whose query loss or direction is NaN/Inf: it names the first non-finite tensor (the
    query loss, else a parameter's meta-gradient), says that nothing changed, and suggests smaller ``tame`` settings."""
    if not torch.isfinite(query_loss):
        tensor, bad = "query loss", query_loss
    else:
        tensor, bad = next((f"meta-gradient of {_meta_parameter(n)}", g) for n, g in direction.items()
                           if not torch.isfinite(g).all())
    return NonFiniteError(
        f"iteration {iteration}: the {tensor} is {'NaN' if torch.isnan(bad).any() else 'Inf'}; θ, the outer optimizer and "
        f"its momentum keep their values of iteration {iteration - 1}. Try a smaller "
        f"{', '.join(f'{k} (now {v})' for k, v in tame.items())}",
        iteration=iteration, tensor=tensor,
    )


def _meta_parameter(key: str) -> str:
    """A meta-parameter's name in words: θ's own name, or "the learned step size of <name>"."""
    return f"the learned step size of {key.removeprefix(LEARNED_LR)}" if is_learned_lr(key) else key


def custom_spec(value: Any) -> dict[str, str]:
    """How a checkpoint records a callable it cannot store: its qualified name, for the error on load."""
    return {"custom": f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"}


def refuse_custom_spec(value: Any, name: str) -> Any:
    """``value`` itself, unless it is the record :func:`custom_spec` left in a checkpoint: then say to pass it again."""
    if isinstance(value, dict) and set(value) == {"custom"}:
        raise ConfigError(f"this learner was trained with a custom {name}, {value['custom']}, which a checkpoint cannot "
                          f"rebuild; pass {name}=<it> to MetaLearner.load")
    return value


def outer_optimizer_class(value: type[torch.optim.Optimizer] | str) -> type[torch.optim.Optimizer]:
    """A torch.optim class, given as the class or by its name ("Adam", "SGD", "AdamW", ...)."""
    cls = getattr(torch.optim, value, None) if isinstance(value, str) else value
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"outer_optimizer must be a torch.optim.Optimizer class or the name of one, got {value!r}")
    return cls
