"""Meta-training runs: configuration, the outer loop with validation, checkpoints, resume, evaluation.

A run folder holds ``config.json`` (a :class:`MetaTrainConfig`, reloadable), ``metrics.jsonl`` (one line
per iteration, plus validation lines; the query metrics before adaptation every ``PRE_ADAPTATION_EVERY``
iterations, as they cost an extra forward pass), ``last.pt`` and ``best.pt`` (best mean accuracy on the fixed
validation TaskSet; never chosen on test tasks) and ``val_tasks.json``. Meta-batch ``it`` is tasks
``it·T … it·T + T − 1`` of a seeded :class:`~metasam.data.EpisodeSampler`, so a resumed run sees exactly
the tasks an uninterrupted run would, and reaches the same weights. Under torchrun the processes share
each meta-batch and the evaluations, and rank 0 alone writes (:mod:`metasam.train.distributed`).

Reliability (docs/reliability.md): every setting is checked before any data is loaded; ``last.pt`` exists
from iteration 0 on and every file is replaced atomically, so a run killed at any moment resumes from its
last complete checkpoint; a NaN/Inf step stops the run (or is skipped, ``skip_nonfinite`` times at most)
without touching θ or the checkpoints.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metasam.checkpoint import (
    config_differences,
    load_checkpoint,
    read_jsonl,
    remove_stale_temporaries,
    save_atomic,
    write_text_atomic,
)
from metasam.data import EpisodeSampler, FewShotDataset, TaskSet
from metasam.data.episodes import check_episode_shape
from metasam.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    MetaSAMError,
    NonFiniteError,
)
from metasam.meta import PRESETS, MetaLearner
from metasam.meta.learner import check_hparams, mean_ci95
from metasam.meta.presets import RULE_PARAMS
from metasam.models import MODELS
from metasam.train.distributed import join
from metasam.train.precision import use_tf32
from metasam.train.splits import load_splits

# ALGORITHMS.md §2, standard settings: (inner_lr, inner_steps, test_inner_steps, meta_batch)
STANDARD = {
    ("omniglot", 5): (0.4, 1, 3, 32),
    ("omniglot", 20): (0.1, 5, 5, 16),
    ("miniimagenet", 5): (0.01, 5, 10, 4),
}
DEFAULT_SPLITS = {
    "omniglot": ("background", None, "evaluation"),
    "miniimagenet": ("train", "val", "test"),
    "glyphs": ("train", "val", "test"),
}
PRE_ADAPTATION_EVERY = 10
"""Iterations between the (extra forward pass) query loss / accuracy before adaptation in metrics.jsonl."""
RULE_KEYS = sorted({f"{lvl}_{p}" for lvl in ("inner", "outer") for ps in RULE_PARAMS.values() for p in ps})
RESUME_OVERRIDES = ("skip_nonfinite",)
"""Settings ``--resume`` may change: they decide what happens on a failure, not what a step computes."""


@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run. None fields take the standard setting of the
    dataset and ways (ALGORITHMS.md §2); ``rule`` holds inner_/outer_ rule hyperparameters."""

    dataset: str = "glyphs"
    data_root: str | None = None
    ways: int = 5
    shots: int = 1
    queries: int = 15
    algo: str = "maml"
    iterations: int = 1000
    meta_batch: int | None = None
    inner_lr: float | None = None
    inner_steps: int | None = None
    test_inner_steps: int | None = None
    first_order: bool | None = None
    outer_lr: float = 1e-3
    test_rule: str = "same"
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    val_every: int = 100
    val_tasks: int = 100
    image_size: int | None = None
    hidden: int | None = None
    model: str = "conv4"
    seed: int = 0
    device: str = "cpu"
    path: str = "auto"
    rule: dict[str, Any] | None = None
    skip_nonfinite: int = 0
    outer_val_tasks: int | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in DEFAULT_SPLITS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DEFAULT_SPLITS)}")
        if self.algo not in PRESETS:
            raise ConfigError(f"unknown --algo {self.algo!r}; choose one of {', '.join(PRESETS)}")
        for name in ("ways", "shots", "queries", "iterations", "val_every", "val_tasks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.model not in ("conv4", "resnet12"):
            raise ConfigError(f"unknown --model {self.model!r}; choose conv4 or resnet12")
        if self.ways < 2:
            raise ConfigError(f"--ways must be >= 2, got {self.ways}")
        self.rule = dict(self.rule or {})
        unknown = sorted(set(self.rule) - set(RULE_KEYS))
        if unknown:
            raise ConfigError(f"unknown rule parameters {unknown}; valid: {RULE_KEYS}")
        family = "omniglot" if self.dataset == "glyphs" else self.dataset
        # the nearest standard setting: Omniglot's 20-way one above 5 ways, MiniImageNet's 5-way one
        lr, steps, test_steps, batch = STANDARD[(family, 20 if family == "omniglot" and self.ways > 5 else 5)]
        if family == "miniimagenet" and self.shots >= 5:
            batch = 2
        self.inner_lr = lr if self.inner_lr is None else self.inner_lr
        self.inner_steps = steps if self.inner_steps is None else self.inner_steps
        self.test_inner_steps = test_steps if self.test_inner_steps is None else self.test_inner_steps
        self.meta_batch = batch if self.meta_batch is None else self.meta_batch
        self.outer_val_tasks = self.meta_batch if self.outer_val_tasks is None else self.outer_val_tasks
        self.image_size = (84 if family == "miniimagenet" else 28) if self.image_size is None else self.image_size
        self.hidden = (32 if family == "miniimagenet" else 64) if self.hidden is None else self.hidden
        train, val, test = DEFAULT_SPLITS[self.dataset]
        self.train_split = self.train_split or train
        self.val_split = self.val_split if self.val_split is not None else val
        self.test_split = self.test_split if self.test_split is not None else test
        for name, low in (("meta_batch", 1), ("outer_val_tasks", 1), ("seed", 0), ("skip_nonfinite", 0)):
            check_int(name, getattr(self, name), low)
        check_hparams(self.algo, self.inner_lr, self.inner_steps, self.test_inner_steps, self.outer_lr,
                      self.test_rule, self.path, **self.rule)

    @classmethod
    def load(cls, path: str | Path) -> "MetaTrainConfig":
        """Read a run's config.json (or a run folder) back."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: not a metasam run folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from a copy of the run folder") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} does not hold a metasam configuration (a JSON object)")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"{path} has settings this metasam does not know: {unknown}; was it written by a newer version?")
        return cls(**data)


def check_int(name: str, value: Any, low: int = 1) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int ≥ ``low``; ``name`` is the setting (``meta_batch``
    is reported as ``--meta-batch``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")


def check_device(device: str) -> None:
    """Refuse a device string torch cannot parse, or CUDA where PyTorch sees none."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but this PyTorch sees no CUDA device; use --device cpu")


def check_new_run_dir(out: str | Path) -> None:
    """Refuse an ``out`` folder that already holds a run (before any work is done)."""
    out = Path(out)
    if (out / "last.pt").exists() or (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")


def load_run_checkpoint(path: str | Path, cfg: MetaTrainConfig) -> dict[str, Any]:
    """Checkpoint ``path`` (read with ``weights_only=True``), checked to belong to ``cfg``; raises
    :class:`CheckpointError` naming the settings that differ (``RESUME_OVERRIDES`` may)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "metasam.checkpoint" or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a metasam meta-training checkpoint")
    try:  # fill settings added since the checkpoint was written with their defaults
        saved = asdict(MetaTrainConfig(**ckpt["config"]))
    except (TypeError, MetaSAMError) as exc:
        raise CheckpointError(f"{path} holds a configuration this metasam cannot read ({exc})") from exc
    current = asdict(cfg)
    for key in RESUME_OVERRIDES:
        saved[key] = current[key]
    if saved != current:
        raise CheckpointError(
            f"{path} was written by another configuration than {cfg.dataset}/{cfg.algo} in config.json "
            f"(checkpoint vs config: {config_differences(saved, current)}); use the run folder it came from"
        )
    return ckpt


def build_learner(cfg: MetaTrainConfig, channels: int) -> MetaLearner:
    """Conv4 (``hidden`` filters, ``image_size`` input) or ResNet-12, seeded, wrapped in a MetaLearner."""
    if cfg.model == "conv4":
        name, model_kwargs = "Conv4", {"ways": cfg.ways, "in_channels": channels, "hidden": cfg.hidden, "image_size": cfg.image_size}
    else:
        name, model_kwargs = "ResNet12", {"ways": cfg.ways, "in_channels": channels}
    torch.manual_seed(cfg.seed)
    model = MODELS[name](**model_kwargs).to(cfg.device)
    learner = MetaLearner(
        model, cfg.algo, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, test_inner_steps=cfg.test_inner_steps,
        first_order=cfg.first_order, outer_lr=cfg.outer_lr, test_rule=cfg.test_rule, path=cfg.path, **cfg.rule,
    )
    learner.model_spec = {"name": name, "kwargs": model_kwargs}
    return learner


def _to(batch, device):
    return type(batch)(*(t.to(device) for t in batch))


class MetaTrainer:
    """Owns a run folder: trains, validates, checkpoints, resumes."""

    def __init__(self, cfg: MetaTrainConfig, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        check_device(cfg.device)
        use_tf32(cfg.tf32)
        self.procs = join(cfg.device, cfg.meta_batch)  # before the model is built: it picks this process's GPU
        if PRESETS[cfg.algo].outer == "agnostic" and cfg.outer_val_tasks < self.procs.world_size:
            raise ConfigError(
                f"--outer-val-tasks {cfg.outer_val_tasks} is smaller than the {self.procs.world_size} processes: each "
                "process needs at least one validation task; raise it or start fewer processes"
            )
        self.train_ds, self.val_ds, self.test_ds = load_splits(
            cfg.dataset, cfg.data_root, cfg.train_split, cfg.val_split, cfg.test_split, cfg.image_size
        )
        for role, ds in (("train", self.train_ds), ("val", self.val_ds), ("test", self.test_ds)):
            if ds is not None:
                try:
                    check_episode_shape(ds, cfg.ways, cfg.shots, cfg.queries)
                except DatasetError as exc:
                    spec = getattr(cfg, f"{role}_split") or "a held-out tenth of the training classes"
                    raise DatasetError(f"--{role}-split {spec}: {exc}") from exc
        total = cfg.iterations * cfg.meta_batch
        self.sampler = EpisodeSampler(self.train_ds, cfg.ways, cfg.shots, cfg.queries, cfg.seed, num_tasks=total)
        # the agnostic outer rule's validation meta-batches: other tasks from the meta-training classes
        self.outer_val_sampler = EpisodeSampler(self.train_ds, cfg.ways, cfg.shots, cfg.queries, cfg.seed + 1,
                                                num_tasks=cfg.iterations * cfg.outer_val_tasks)
        self.val_set = TaskSet.sample(self.val_ds, cfg.val_tasks, cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed + 2)
        self.learner = build_learner(cfg, self.train_ds.image_shape[0])
        self.learner.reducer = self.procs.reducer
        self.best_val, self.best_iteration = -1.0, 0
        self.skipped_nonfinite, self.checkpoint_iteration = 0, 0

    def _checkpoint(self) -> dict[str, Any]:
        return {
            "format": "metasam.checkpoint", "version": 1,
            "config": asdict(self.cfg), "hparams": self.learner.hparams, "model": self.learner.model_spec,
            "learner": self.learner.state_dict(), "best_val": self.best_val, "best_iteration": self.best_iteration,
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    def _save(self, name: str) -> None:
        if self.procs.is_main:
            try:
                save_atomic(self._checkpoint(), self.out / name)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; then continue the run with: metasam train --resume {self.out}") from exc
        if name == "last.pt":
            self.checkpoint_iteration = self.learner.iteration

    def start(self) -> None:
        """Create the run folder: config.json, val_tasks.json and an iteration-0 last.pt (so a kill at
        any later moment leaves a checkpoint to resume from). Under torchrun only rank 0 checks and writes."""
        if not self.procs.is_main:
            return
        check_new_run_dir(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(asdict(self.cfg), indent=2), self.out / "config.json")
        self.val_set.save(self.out / "val_tasks.json")
        self._save("last.pt")

    def resume(self, ckpt: dict[str, Any] | None = None) -> None:
        """Continue from last.pt (or ``ckpt``, read by :func:`load_run_checkpoint`); metric lines written
        after it are dropped so that the log matches the resumed weights."""
        ckpt = ckpt or load_run_checkpoint(self.out / "last.pt", self.cfg)
        self.learner.load_state_dict(ckpt["learner"], self.out / "last.pt")
        self.best_val, self.best_iteration = ckpt["best_val"], ckpt["best_iteration"]
        self.skipped_nonfinite = ckpt.get("skipped_nonfinite", 0)
        self.checkpoint_iteration = self.learner.iteration
        if not self.procs.is_main:
            return
        remove_stale_temporaries(self.out)  # left by a kill between writing and renaming a file
        write_text_atomic(json.dumps(asdict(self.cfg), indent=2), self.out / "config.json")  # RESUME_OVERRIDES
        log = self.out / "metrics.jsonl"
        if log.exists():
            keep = [r for r in read_jsonl(log) if r.get("iteration", math.inf) <= self.learner.iteration]
            write_text_atomic("".join(json.dumps(r) + "\n" for r in keep), log)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.procs.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def validate(self) -> float:
        acc, ci = self.learner.evaluate(self.val_set)
        it = self.learner.iteration
        self._log({"iteration": it, "val_acc": acc, "val_ci95": ci})
        if acc > self.best_val:
            self.best_val, self.best_iteration = acc, it
            self._save("best.pt")
        self._save("last.pt")
        return acc

    def _skip_nonfinite(self, exc: NonFiniteError) -> dict[str, Any]:
        """Count a NaN/Inf step as skipped (θ, optimizer and momentum untouched; its meta-batch consumed),
        or stop the run once more than ``skip_nonfinite`` steps failed, keeping the checkpoints as they are."""
        if self.skipped_nonfinite >= self.cfg.skip_nonfinite:
            self._log({"iteration": exc.iteration, "nonfinite": exc.tensor, "stopped": True})
            skipped = f" after skipping {self.skipped_nonfinite} such step(s)" if self.skipped_nonfinite else ""
            raise NonFiniteError(
                f"{exc}. The run stopped{skipped}; {self.out / 'last.pt'} keeps iteration {self.checkpoint_iteration}. "
                f"To skip such steps instead: metasam train --resume {self.out} --skip-nonfinite {self.skipped_nonfinite + 1}",
                iteration=exc.iteration, tensor=exc.tensor,
            ) from exc
        self.skipped_nonfinite += 1
        self.learner.iteration += 1
        return {"skipped_nonfinite": self.skipped_nonfinite, "nonfinite": exc.tensor}

    def train(self, progress: bool = True) -> dict[str, Any]:
        cfg, learner = self.cfg, self.learner
        stop = {"signal": None}

        def on_signal(signum, frame):  # finish the current iteration, then save and leave
            stop["signal"] = signum

        def stopping() -> bool:  # any process's signal stops all of them after the same iteration
            stop["agreed"] = self.procs.agree_on_signal(stop["signal"])
            return stop["agreed"] is not None

        self.procs.broadcast_weights(learner.model)
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.iterations, initial=learner.iteration, disable=not progress or not self.procs.is_main,
                   unit="it", desc=cfg.algo)
        try:
            while learner.iteration < cfg.iterations and not stopping():
                it = learner.iteration
                tasks = self.procs.share(range(it * cfg.meta_batch, (it + 1) * cfg.meta_batch))
                batch = _to(self.sampler.batch(tasks), cfg.device)
                val_batch = None
                if learner.outer_rule.name == "agnostic":
                    v = cfg.outer_val_tasks
                    val_batch = _to(self.outer_val_sampler.batch(self.procs.share(range(it * v, (it + 1) * v))), cfg.device)
                start = time.perf_counter()
                try:
                    metrics = learner.meta_step(batch, val_batch, pre_adaptation=it % PRE_ADAPTATION_EVERY == 0)
                except NonFiniteError as exc:  # the same on every process: the loss and direction are all-reduced
                    metrics = self._skip_nonfinite(exc)
                metrics["tasks_per_s"] = cfg.meta_batch / (time.perf_counter() - start)
                self._log({"iteration": learner.iteration, **metrics})
                bar.update(1)
                if "query_loss" in metrics:  # a skipped step has none
                    bar.set_postfix(loss=f"{metrics['query_loss']:.3f}", acc=f"{metrics['query_acc']:.3f}",
                                    tasks_s=f"{metrics['tasks_per_s']:.1f}", best_val=f"{max(self.best_val, 0):.3f}")
                if learner.iteration % cfg.val_every == 0 or learner.iteration == cfg.iterations:
                    self.validate()
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if stop["signal"] is not None or stop.get("agreed") is not None:
            self._save("last.pt")
            raise KeyboardInterrupt(
                f"stopped by {signal.Signals(stop['signal'] or stop['agreed']).name} at iteration {learner.iteration}; "
                f"checkpoint {self.out / 'last.pt'} saved. Continue with: metasam train --resume {self.out}"
            )
        summary = {"iterations": learner.iteration, "best_val_acc": self.best_val, "best_iteration": self.best_iteration,
                   "skipped_nonfinite": self.skipped_nonfinite}
        if self.procs.is_main:
            write_text_atomic(json.dumps(summary, indent=2), self.out / "train_summary.json")
        return summary


def evaluate_run(run_dir: str | Path, episodes: int = 600, seed: int = 1234, which: str = "best",
                 test_split: str | None = None, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Mean accuracy ± 95 % CI of a run's ``which`` checkpoint on a fixed seeded TaskSet of the test split;
    also written to ``RUN_DIR/eval_<which>_<episodes>_seed<seed>.json``."""
    run_dir = Path(run_dir)
    cfg = MetaTrainConfig.load(run_dir)
    split = test_split or cfg.test_split
    if not split:
        raise ConfigError("the run has no test split; pass --test-split")
    check_int("episodes", episodes)
    if steps is not None:
        check_int("steps", steps)
    path = run_dir / f"{which}.pt"
    procs = join("cpu")  # under torchrun the processes share the tasks
    learner = MetaLearner.from_checkpoint(load_run_checkpoint(path, cfg), path, reducer=procs.reducer)
    _, _, test_ds = load_splits(cfg.dataset, cfg.data_root, cfg.train_split, cfg.val_split, split, cfg.image_size)
    tasks = TaskSet.sample(test_ds, episodes, cfg.ways, cfg.shots, cfg.queries, seed=seed)
    accuracies = learner.task_accuracies(tasks, steps=steps, progress=progress and procs.is_main)
    mean, ci = mean_ci95(accuracies)
    result = {"run": str(run_dir), "checkpoint": which, "algo": cfg.algo, "test_split": split, "episodes": episodes,
              "seed": seed, "ways": cfg.ways, "shots": cfg.shots, "test_inner_steps": steps or cfg.test_inner_steps,
              "accuracy": mean, "ci95": ci, "task_accuracies": accuracies}
    if procs.is_main:
        write_text_atomic(json.dumps(result, indent=2), run_dir / f"eval_{which}_{episodes}_seed{seed}.json")
    return result


def datasets_summary(*datasets: FewShotDataset | None) -> str:
    return "; ".join(repr(d) for d in datasets if d is not None)
