"""Run the sharpness diagnostics on a finished run folder (meta-learning or supervised)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from metasam.analysis import hessian_eigenvalues, loss_landscape, meta_loss_fn, model_loss_fn, plot_landscape
from metasam.analysis.landscape import landscape_paths
from metasam.atomic_write import write_text_atomic
from metasam.checkpoint import content_digest, load_checkpoint
from metasam.data import TaskSet
from metasam.data.label_noise import symmetric_label_noise
from metasam.errors import CheckpointError, ConfigError, NonFiniteError
from metasam.meta import MetaLearner
from metasam.train.config import MetaTrainConfig
from metasam.train.evaluation import check_finite_weights, learner_weights
from metasam.train.splits import load_splits as load_meta_splits
from metasam.train.supervised import SupervisedConfig, load_splits, make_model


def _meta_loss(run_dir: Path, tasks: int, loss: str):
    cfg = MetaTrainConfig.load(run_dir)
    learner = MetaLearner.load(run_dir, which="best")
    check_finite_weights(learner_weights(learner), run_dir / "best.pt")
    _, val_ds, _ = load_meta_splits(cfg.dataset, cfg.data_root, cfg.train_split, cfg.val_split, None, cfg.image_size)
    val = TaskSet.load(run_dir / "val_tasks.json", val_ds)
    chosen = [val[i] for i in range(min(tasks, len(val)))]
    params = {n: learner.params[n].detach() for n in learner.names}
    what = (f"post-adaptation query loss over {len(chosen)} validation tasks" if loss == "query"
            else f"support loss at θ over {len(chosen)} validation tasks")
    return meta_loss_fn(learner, chosen, loss), params, what


def json_object(path: Path) -> dict[str, Any]:
    """The JSON object that ``path`` holds; anything else raises :class:`CheckpointError` naming the file."""
    try:
        obj = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a JSON object ({exc}); restore it from a copy of the run folder") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a JSON object (it holds a {type(obj).__name__}); restore it from a copy "
                              "of the run folder")
    return obj


def check_model_digest(run_dir: Path, state: dict[str, Any]) -> None:
    """Refuse a supervised run's model.pt whose content hash differs from the ``model_sha256`` its result.json
    records (runs from 2026-12-02 on; older ones, and runs killed before result.json was written, have none)."""
    record = run_dir / "result.json"
    if not record.is_file():
        return
    expected = json_object(record).get("model_sha256")
    if expected is not None and content_digest(state) != expected:
        raise CheckpointError(f"{run_dir / 'model.pt'} fails its content check against the model_sha256 of {record}: "
                              "the file is damaged or was replaced; restore it from a copy of the run folder")


def _supervised_loss(run_dir: Path, config: dict[str, Any]):
    cfg = SupervisedConfig(**config)
    splits = load_splits(cfg)
    model = make_model(cfg, splits.num_classes)
    state = load_checkpoint(run_dir / "model.pt")
    check_model_digest(run_dir, state)
    check_finite_weights(state, run_dir / "model.pt")
    model.load_state_dict(state)
    model.eval()  # running BatchNorm statistics, as at test time
    x, y_clean = splits.train
    y = symmetric_label_noise(y_clean, cfg.label_noise, splits.num_classes, seed=cfg.seed + 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    return model_loss_fn(model, (x, y)), params, f"training loss (noisy labels) over {len(x)} images, eval-mode BatchNorm"


MAX_EIGENVALUES = 100
"""Lanczos finds the top few eigenvalues; its memory grows with k times the parameter count."""
MAX_STEPS = 201
"""Landscape grid points per axis: steps² loss evaluations."""


def check_options(k: int, tasks: int, steps: int, span: float, seed: int) -> None:
    """Raise :class:`ConfigError` naming the first flag of ``metasam analyze`` out of range (before any loading)."""
    for flag, value, low, high in (("k", k, 1, MAX_EIGENVALUES), ("tasks", tasks, 1, None), ("steps", steps, 2, MAX_STEPS),
                                   ("seed", seed, 0, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(f"--{flag} must be an int {bound}, got {value!r}")
    if not isinstance(span, (int, float)) or not 0 < span < math.inf:
        raise ConfigError(f"--span must be a finite number > 0, got {span!r}")


def check_finite(what: str, values: np.ndarray, remedy: str) -> None:
    """Raise :class:`NonFiniteError` when ``values`` (``what`` in the message) hold NaN or Inf."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise NonFiniteError(f"{what} is not finite ({int(bad.sum())} of {bad.size} values NaN/Inf); {remedy}", tensor=what)


DEFAULTS = {"k": 5, "tasks": 20, "loss": "query", "steps": 11, "span": 1.0, "seed": 0}
"""The settings of ``metasam analyze`` without flags (and of :func:`analyze_run`)."""


def output_suffix(settings: dict[str, Any], is_meta: bool, plots: bool = False) -> str:
    """What the names of an analysis's files add for ``settings`` away from :data:`DEFAULTS`: "" for the
    defaults (``analysis.json``, ``landscape_contour.png``), else e.g. ``_hessian_k20_seed1`` (only one of the
    two diagnostics, then each other setting in a fixed order; ``tasks`` and ``loss`` only for meta runs), so
    that an analysis with other settings never overwrites another. ``plots``: the suffix of the landscape's
    PNGs, which leaves out what the landscape does not depend on (``k``, and whether the Hessian ran too)."""
    alone = settings["hessian"] != settings["landscape"] and not plots
    parts = ["hessian" if settings["hessian"] else "landscape"] if alone else []
    for name, value in settings.items():
        if (name in DEFAULTS and value != DEFAULTS[name] and (is_meta or name not in ("tasks", "loss"))
                and not (plots and name == "k")):
            parts.append(value if name == "loss" else f"{name}{value:g}" if name == "span" else f"{name}{value}")
    return "".join(f"_{part}" for part in parts)


def analyze_run(run_dir: str | Path, hessian: bool = True, landscape: bool = True, k: int = DEFAULTS["k"],
                tasks: int = DEFAULTS["tasks"], loss: str = DEFAULTS["loss"], steps: int = DEFAULTS["steps"],
                span: float = DEFAULTS["span"], seed: int = DEFAULTS["seed"], progress: bool = True,
                overwrite: bool = False) -> dict[str, Any]:
    """Top-k Hessian eigenvalues and/or a 2-D landscape of a run's loss; writes ``analysis<suffix>.json`` and
    ``landscape<suffix>_contour.png`` / ``…_surface.png`` into the run folder, the suffix naming the settings
    away from :data:`DEFAULTS` (:func:`output_suffix`), and returns the result. Files of an earlier analysis
    with the same settings are refused before anything is computed, unless ``overwrite``. Non-finite weights,
    losses or eigenvalues raise :class:`NonFiniteError` (nothing is written)."""
    run_dir = Path(run_dir)
    if not (hessian or landscape):
        raise ConfigError("nothing to do: pass hessian=True and/or landscape=True")
    check_options(k, tasks, steps, span, seed)
    config = run_dir / "config.json"
    if not config.is_file():
        raise ConfigError(f"{config} does not exist: not a metasam run folder")
    saved = json_object(config)
    is_meta = "algo" in saved
    settings = {"hessian": hessian, "landscape": landscape, "k": k, "tasks": tasks, "loss": loss, "steps": steps,
                "span": span, "seed": seed}
    file = run_dir / f"analysis{output_suffix(settings, is_meta)}.json"
    prefix = run_dir / f"landscape{output_suffix(settings, is_meta, plots=True)}"
    written = [p for p in (file, *(landscape_paths(prefix) if landscape else ())) if p.exists()]
    if written and not overwrite:
        raise ConfigError(f"{written[0]} exists (an analysis with these settings): pass --overwrite to replace it "
                          "(overwrite=True in Python), or choose other settings")
    loss_fn, params, what = _meta_loss(run_dir, tasks, loss) if is_meta else _supervised_loss(run_dir, saved)
    at_theta = float(loss_fn(params))
    check_finite("the loss at θ", np.array(at_theta), "the model's predictions overflow on these tasks")
    result: dict[str, Any] = {"run": str(run_dir), "settings": settings, "loss_description": what, "loss_at_theta": at_theta}
    if hessian:
        values = hessian_eigenvalues(loss_fn, params, k=k, seed=seed, progress=progress).numpy()
        check_finite("the Hessian's top eigenvalues", values, "the loss is not twice differentiable here")
        result["hessian_top_eigenvalues"] = values.tolist()
    if landscape:
        alphas, betas, losses = loss_landscape(loss_fn, params, steps=steps, span=span, seed=seed, progress=progress)
        check_finite("the loss landscape", losses, f"the loss overflows within --span {span}: try a smaller --span")
        paths = plot_landscape(alphas, betas, losses, prefix, title=run_dir.name)
        result["landscape"] = {"alphas": alphas.tolist(), "betas": betas.tolist(), "losses": losses.tolist(),
                               "plots": [str(p) for p in paths], "seed": seed, "span": span}
    result["file"] = str(file)
    write_text_atomic(json.dumps(result, indent=2, allow_nan=False), result["file"])
    return result
