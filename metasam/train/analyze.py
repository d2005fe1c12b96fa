"""Run the sharpness diagnostics on a finished run folder (meta-learning or supervised)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metasam.analysis import hessian_eigenvalues, loss_landscape, meta_loss_fn, model_loss_fn, plot_landscape
from metasam.checkpoint import load_checkpoint
from metasam.data import TaskSet
from metasam.data.label_noise import symmetric_label_noise
from metasam.errors import ConfigError
from metasam.meta import MetaLearner
from metasam.train.config import MetaTrainConfig
from metasam.train.splits import load_splits as load_meta_splits
from metasam.train.supervised import SupervisedConfig, load_splits, make_model


def _meta_loss(run_dir: Path, tasks: int, kind: str):
    cfg = MetaTrainConfig.load(run_dir)
    learner = MetaLearner.load(run_dir, which="best")
    _, val_ds, _ = load_meta_splits(cfg.dataset, cfg.data_root, cfg.train_split, cfg.val_split, None, cfg.image_size)
    val = TaskSet.load(run_dir / "val_tasks.json", val_ds)
    chosen = [val[i] for i in range(min(tasks, len(val)))]
    params = {n: learner.params[n].detach() for n in learner.names}
    what = (f"post-adaptation query loss over {len(chosen)} validation tasks" if kind == "query"
            else f"support loss at θ over {len(chosen)} validation tasks")
    return meta_loss_fn(learner, chosen, kind), params, what


def _supervised_loss(run_dir: Path):
    data = json.loads((run_dir / "config.json").read_text())
    cfg = SupervisedConfig(**data)
    splits = load_splits(cfg)
    model = make_model(cfg, splits.num_classes)
    model.load_state_dict(load_checkpoint(run_dir / "model.pt"))
    model.eval()  # running BatchNorm statistics, as at test time
    x, y_clean = splits.train
    y = symmetric_label_noise(y_clean, cfg.label_noise, splits.num_classes, seed=cfg.seed + 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    return model_loss_fn(model, (x, y)), params, f"training loss (noisy labels) over {len(x)} images, eval-mode BatchNorm"


def analyze_run(run_dir: str | Path, hessian: bool = True, landscape: bool = True, k: int = 5, tasks: int = 20,
                kind: str = "query", steps: int = 21, span: float = 1.0, seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """Top-k Hessian eigenvalues and/or a 2-D landscape of a run's loss; writes ``analysis.json`` and
    ``landscape_contour.png`` / ``landscape_surface.png`` into the run folder."""
    run_dir = Path(run_dir)
    if not (hessian or landscape):
        raise ConfigError("nothing to do: pass --hessian and/or --landscape")
    config = run_dir / "config.json"
    if not config.is_file():
        raise ConfigError(f"{config} does not exist: not a metasam run folder")
    is_meta = "algo" in json.loads(config.read_text())
    loss_fn, params, what = _meta_loss(run_dir, tasks, kind) if is_meta else _supervised_loss(run_dir)
    result: dict[str, Any] = {"run": str(run_dir), "loss": what, "loss_at_theta": float(loss_fn(params))}
    if hessian:
        result["hessian_top_eigenvalues"] = hessian_eigenvalues(loss_fn, params, k=k, seed=seed, progress=progress).tolist()
    if landscape:
        alphas, betas, losses = loss_landscape(loss_fn, params, steps=steps, span=span, seed=seed, progress=progress)
        paths = plot_landscape(alphas, betas, losses, run_dir / "landscape", title=run_dir.name)
        result["landscape"] = {"alphas": alphas.tolist(), "betas": betas.tolist(), "losses": losses.tolist(),
                               "plots": [str(p) for p in paths], "seed": seed, "span": span}
    (run_dir / "analysis.json").write_text(json.dumps(result, indent=2))
    return result

