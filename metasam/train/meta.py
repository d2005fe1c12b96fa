"""Meta-training runs: the outer loop with validation, checkpoints and resume.

A run folder holds ``config.json`` (a :class:`~metasam.train.config.MetaTrainConfig`, reloadable),
``metrics.jsonl`` (one line per iteration, plus validation lines; the query metrics before adaptation every
``PRE_ADAPTATION_EVERY`` iterations, as they cost an extra forward pass), ``last.pt`` (written at every
validation, and between them once ``CHECKPOINT_SECONDS`` have passed since the last write) and ``best.pt`` (best
mean accuracy on the fixed validation TaskSet; never chosen on test tasks) and ``val_tasks.json``.
Meta-batch ``it`` is tasks ``it·T … it·T + T − 1`` of a seeded :class:`~metasam.data.EpisodeSampler`, so a
resumed run sees exactly the tasks an uninterrupted run would, and reaches the same weights. Under torchrun
the processes share each meta-batch and the evaluations, and rank 0 alone writes
(:mod:`metasam.train.distributed`).

Reliability (docs/reliability.md): every setting is checked before any data is loaded; one process at a
time trains in a run folder (:class:`~metasam.train.run_folder.RunLock`); ``last.pt`` exists from
iteration 0 on and every file is replaced atomically, so a run killed at any moment resumes from its last
complete checkpoint; each checkpoint carries a hash of its contents, checked when it is read; a NaN/Inf
step stops the run (or is skipped, ``skip_nonfinite`` times at most) without touching θ or the checkpoints.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metasam.atomic_write import remove_stale_temporaries, write_failure, write_text_atomic
from metasam.checkpoint import read_jsonl
from metasam.data import EpisodeSampler, FewShotDataset, TaskSet
from metasam.data.episodes import check_episode_shape
from metasam.errors import CheckpointError, ConfigError, DatasetError, NonFiniteError
from metasam.meta import PRESETS, MetaLearner
from metasam.models import MODELS
from metasam.train.config import MetaTrainConfig, as_flags, check_device, check_meta_batch_memory
from metasam.train.distributed import join
from metasam.train.precision import use_tf32
from metasam.train.run_checkpoint import load_run_checkpoint, write_run_checkpoint
from metasam.train.run_folder import RUN_FILES, RunLock, check_new_run_dir
from metasam.train.splits import load_splits

PRE_ADAPTATION_EVERY = 10
"""Iterations between the (extra forward pass) query loss / accuracy before adaptation in metrics.jsonl."""
EXPLODING_LOSS = 100
"""A query loss this many times the loss of guessing at random (ln ways) warns that the run diverges."""
CHECKPOINT_SECONDS = 300
"""last.pt is also written after an iteration that ends this long after the last write, so that a run killed
without warning (SIGKILL, a machine lost) loses at most about this much work, whatever ``--val-every`` is."""


def build_learner(cfg: MetaTrainConfig, channels: int) -> MetaLearner:
    """Conv4 (``hidden`` filters, ``image_size`` input; as :class:`~metasam.models.CPUConv4` on a CPU outside
    the vmap path, the same function computed faster there) or ResNet-12, seeded, wrapped in a MetaLearner that
    adapts all its parameters, or its ``head`` alone (``cfg.adapt``, ANIL)."""
    if cfg.model == "conv4":
        cpu_blocks = torch.device(cfg.device).type == "cpu" and cfg.path != "vmap"
        name = "CPUConv4" if cpu_blocks else "Conv4"
        model_kwargs = {"ways": cfg.ways, "in_channels": channels, "hidden": cfg.hidden, "image_size": cfg.image_size}
    else:
        name, model_kwargs = "ResNet12", {"ways": cfg.ways, "in_channels": channels}
    torch.manual_seed(cfg.seed)
    model = MODELS[name](**model_kwargs).to(cfg.device)
    learner = MetaLearner(
        model, cfg.algo, inner_lr=cfg.inner_lr, learn_inner_lr=cfg.learn_inner_lr, inner_steps=cfg.inner_steps,
        test_inner_steps=cfg.test_inner_steps, adapt=model.head if cfg.adapt == "head" else None,
        first_order=cfg.first_order, outer_lr=cfg.outer_lr, test_rule=cfg.test_rule, path=cfg.path,
        task_threads=cfg.task_threads,
        inner_rule=cfg.inner_rule, outer_rule=cfg.outer_rule, val_view=cfg.validation_view(),
    )
    learner.model_spec = {"name": name, "kwargs": model_kwargs}
    return learner


def _to(batch, device):
    return type(batch)(*(t.to(device) for t in batch))


class MetaTrainer:
    """Owns a run folder: trains, validates, checkpoints, resumes.

    From its creation to :meth:`close` (or the end of a ``with`` block, or of the process) the trainer holds
    the folder's :class:`~metasam.train.run_folder.RunLock`: another process that tries to train there is
    refused before it loads any data.
    """

    def __init__(self, cfg: MetaTrainConfig, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        check_device(cfg.device)
        check_meta_batch_memory(cfg)
        use_tf32(cfg.tf32)
        self.procs = join(cfg.device, cfg.meta_batch)  # before the model is built: it picks this process's GPU
        if (PRESETS[cfg.algo].outer == "agnostic" or cfg.alignment_every) and cfg.outer_val_tasks < self.procs.world_size:
            raise ConfigError(
                f"--outer-val-tasks {cfg.outer_val_tasks} is smaller than the {self.procs.world_size} processes: each "
                "process needs at least one validation task; raise it or start fewer processes"
            )
        self.lock = RunLock(self.out, create=True).acquire() if self.procs.is_main else None
        try:
            self._load(cfg)
        except BaseException:
            self.close()  # a folder this trainer created for nothing is removed again
            raise
        self.exploding_warned = False

    def _load(self, cfg: MetaTrainConfig) -> None:
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
        self.checkpoint_time = time.monotonic()

    def _save(self, name: str) -> None:
        if self.procs.is_main:
            progress = {"best_val": self.best_val, "best_iteration": self.best_iteration,
                        "skipped_nonfinite": self.skipped_nonfinite}
            write_run_checkpoint(self.out / name, self.cfg, self.learner, progress)
        if name == "last.pt":
            self.checkpoint_iteration, self.checkpoint_time = self.learner.iteration, time.monotonic()

    def start(self, restart: bool = False) -> None:
        """Fill the run folder: config.json, val_tasks.json and an iteration-0 last.pt (so a kill at any later
        moment leaves a checkpoint to resume from). The folder must be empty, or with ``restart`` hold a run
        stopped before its first checkpoint. Under torchrun only rank 0 checks and writes."""
        if not self.procs.is_main:
            return
        if not restart:
            check_new_run_dir(self.out)
        write_text_atomic(json.dumps(self.cfg.to_dict(), indent=2), self.out / "config.json")
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
        remove_stale_temporaries(self.out, RUN_FILES)  # left by a kill between writing and renaming a file
        write_text_atomic(json.dumps(self.cfg.to_dict(), indent=2), self.out / "config.json")  # RESUME_OVERRIDES
        log = self.out / "metrics.jsonl"
        if log.exists():
            keep = [r for r in read_jsonl(log) if r.get("iteration", math.inf) <= self.learner.iteration]
            write_text_atomic("".join(json.dumps(r) + "\n" for r in keep), log)

    def close(self) -> None:
        """Release the run folder's lock (the trainer writes nothing after this)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "MetaTrainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _log(self, record: dict[str, Any]) -> None:
        if not self.procs.is_main:
            return
        line = (json.dumps(record) + "\n").encode()
        log = self.out / "metrics.jsonl"
        try:
            with open(log, "ab") as f:
                f.write(line)
        except OSError as exc:
            reason, remedy = write_failure(self.out, exc, lambda f: f.write(line))
            raise CheckpointError(
                f"cannot append to {log}: {reason}; {self.out / 'last.pt'} keeps iteration {self.checkpoint_iteration}. "
                f"{remedy}; then continue the run with: metasam train --resume {self.out}") from exc

    def _warn_if_exploding(self, metrics: dict[str, Any]) -> None:
        """Warn once when the query loss is ``EXPLODING_LOSS`` times chance: finite, but diverging."""
        chance = math.log(self.cfg.ways)
        loss = metrics.get("query_loss", 0.0)
        if self.exploding_warned or loss <= EXPLODING_LOSS * chance:
            return
        self.exploding_warned = True
        warnings.warn(
            f"iteration {self.learner.iteration}: the query loss is {loss:.3g}, {loss / chance:.3g}× that of guessing "
            f"at random (ln {self.cfg.ways} = {chance:.2f}): the run is diverging. Stop it and try a smaller --inner-lr "
            f"(now {self.cfg.inner_lr}) or --outer-lr (now {self.cfg.outer_lr})", stacklevel=2)

    def validate(self) -> float:
        """Accuracy on the fixed validation tasks, logged; saves best.pt when it beats the best so far, and
        last.pt."""
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
                f"{as_flags(str(exc))}. The run stopped{skipped}; {self.out / 'last.pt'} keeps iteration {self.checkpoint_iteration}. "
                f"To skip such steps instead: metasam train --resume {self.out} --skip-nonfinite {self.skipped_nonfinite + 1}",
                iteration=exc.iteration, tensor=exc.tensor,
            ) from exc
        self.skipped_nonfinite += 1
        self.learner.iteration += 1
        return {"skipped_nonfinite": self.skipped_nonfinite, "nonfinite": exc.tensor}

    def train(self, progress: bool = True) -> dict[str, Any]:
        """Meta-train up to ``cfg.iterations``: validate every ``val_every`` iterations and at the last, save
        last.pt between validations every ``CHECKPOINT_SECONDS``. SIGINT or SIGTERM finishes the iteration, saves
        last.pt and raises ``KeyboardInterrupt`` naming the resume command. Returns the summary also written to
        train_summary.json."""
        cfg, learner = self.cfg, self.learner
        stop = {"signal": None}

        def on_signal(signum, frame):  # finish the current iteration, then save and leave
            stop["signal"] = signum

        def stopping() -> bool:  # any process's signal stops all of them after the same iteration
            stop["agreed"] = self.procs.agree_on_signal(stop["signal"])
            return stop["agreed"] is not None

        self.procs.broadcast_weights(learner.model, *learner.inner_lrs.values())
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.iterations, initial=learner.iteration, disable=not progress or not self.procs.is_main,
                   unit="it", desc=cfg.algo)
        try:
            while learner.iteration < cfg.iterations and not stopping():
                it = learner.iteration
                tasks = self.procs.share(range(it * cfg.meta_batch, (it + 1) * cfg.meta_batch))
                batch = _to(self.sampler.batch(tasks), cfg.device)
                val_batch = None
                aligned = cfg.alignment_every > 0 and (it + 1) % cfg.alignment_every == 0
                if learner.outer_rule.name == "agnostic" or aligned:  # the alignment's g_V: the same draws
                    v = cfg.outer_val_tasks
                    val_batch = _to(self.outer_val_sampler.batch(self.procs.share(range(it * v, (it + 1) * v))), cfg.device)
                start = time.perf_counter()
                try:
                    metrics = learner.meta_step(batch, val_batch, pre_adaptation=it % PRE_ADAPTATION_EVERY == 0,
                                                alignment=aligned)
                except NonFiniteError as exc:  # the same on every process: the loss and direction are all-reduced
                    metrics = self._skip_nonfinite(exc)
                metrics["tasks_per_s"] = cfg.meta_batch / (time.perf_counter() - start)
                metrics["task_threads"] = learner.task_threads  # "auto" may turn to 1 (a model that draws random numbers)
                self._log({"iteration": learner.iteration, **metrics})
                self._warn_if_exploding(metrics)
                bar.update(1)
                if "query_loss" in metrics:  # a skipped step has none
                    bar.set_postfix(loss=f"{metrics['query_loss']:.3f}", acc=f"{metrics['query_acc']:.3f}",
                                    tasks_s=f"{metrics['tasks_per_s']:.1f}", best_val=f"{max(self.best_val, 0):.3f}")
                if learner.iteration % cfg.val_every == 0 or learner.iteration == cfg.iterations:
                    self.validate()
                elif time.monotonic() - self.checkpoint_time >= CHECKPOINT_SECONDS:
                    self._save("last.pt")
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


def datasets_summary(*datasets: FewShotDataset | None) -> str:
    """One line describing the datasets given (None left out)."""
    return "; ".join(repr(d) for d in datasets if d is not None)
