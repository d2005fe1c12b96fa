"""A run's checkpoints, written and read in one place: ``last.pt`` and ``best.pt`` of a run folder.

A checkpoint is ``{"format": "metasam.checkpoint", "version", "config": MetaTrainConfig.to_dict(), "hparams":
the learner's constructor arguments, "model": {"name", "kwargs"}, "learner": its state dict, "best_val",
"best_iteration", "skipped_nonfinite", "content_sha256"}``, written atomically, with the hash of its contents,
and read with ``weights_only=True`` (loading it never runs code from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metasam.atomic_write import save_atomic
from metasam.checkpoint import DIGEST_KEY, config_differences, load_checkpoint
from metasam.errors import CheckpointError, MetaSAMError
from metasam.meta import MetaLearner
from metasam.train.config import RESUME_OVERRIDES, MetaTrainConfig

CHECKPOINT_VERSION = 2
"""1: no content hash; 2: a hash of the contents (``content_sha256``), required when read."""


def write_run_checkpoint(path: Path, cfg: MetaTrainConfig, learner: MetaLearner, progress: dict[str, Any]) -> None:
    """Write ``learner``'s checkpoint of the run ``cfg`` to ``path`` (in a run folder), with the trainer's
    ``progress`` (best_val, best_iteration, skipped_nonfinite); a failed write names how to continue."""
    ckpt = {"format": "metasam.checkpoint", "version": CHECKPOINT_VERSION, "config": cfg.to_dict(),
            "hparams": learner.hparams, "model": learner.model_spec, "learner": learner.state_dict(), **progress}
    try:
        save_atomic(ckpt, path, digest=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; then continue the run with: metasam train --resume {path.parent}") from exc


def load_run_checkpoint(path: str | Path, cfg: MetaTrainConfig) -> dict[str, Any]:
    """Checkpoint ``path`` (read with ``weights_only=True``), checked to belong to ``cfg``; raises
    :class:`CheckpointError` naming the settings that differ (``RESUME_OVERRIDES`` may)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "metasam.checkpoint" or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a metasam meta-training checkpoint")
    if ckpt.get("version", 1) >= 2 and DIGEST_KEY not in ckpt:
        raise CheckpointError(f"checkpoint {path} has lost its content hash: the file is damaged; restore it from a copy")
    try:  # fill settings added since the checkpoint was written with their defaults
        saved = MetaTrainConfig.from_dict(ckpt["config"]).to_dict()
    except (TypeError, MetaSAMError) as exc:
        raise CheckpointError(f"{path} holds a configuration this metasam cannot read ({exc})") from exc
    current = cfg.to_dict()
    for key in RESUME_OVERRIDES:
        saved[key] = current[key]
    if saved != current:
        raise CheckpointError(
            f"{path} was written by another configuration than {cfg.dataset}/{cfg.algo} in config.json "
            f"(checkpoint vs config: {config_differences(saved, current)}); use the run folder it came from"
        )
    return ckpt
