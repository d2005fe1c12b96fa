"""``metasam train``: meta-train MAML / Sharp-MAML / Agnostic-SAM on a few-shot dataset (or resume a run)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from metasam.cli.flags import add, add_run_flags, rules_from_flags, settings_given
from metasam.errors import ConfigError, RunFolderInUse
from metasam.train.config import RESUME_OVERRIDES, MetaTrainConfig, as_flags, check_device
from metasam.train.meta import MetaTrainer, datasets_summary
from metasam.train.run_checkpoint import load_run_checkpoint
from metasam.train.run_folder import check_new_run_dir, check_restartable, check_writable

DEFAULTS: dict[str, object] = {}
"""The parser's defaults: with --resume, any other value is a setting the saved run would ignore."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="meta-train on Omniglot, MiniImageNet or the synthetic glyph set",
                       description="Meta-train a Conv4 (or a ResNet-12, --model resnet12). Unset hyperparameters take the "
                       "standard setting of the dataset and ways (and shots, for MiniImageNet's meta-batch; Finn et "
                       "al. 2017). Checkpoints on a fixed validation task set.")
    add_run_flags(p)
    add(p, "--out", help="new run folder (config, metrics.jsonl, last.pt, best.pt); must be empty or new")
    add(p, "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved configuration")
    add(p, "--no-progress", action="store_true", help="no progress bar")
    DEFAULTS.update(vars(p.parse_args([])))


def run(args: argparse.Namespace) -> int:
    """Check every setting (and the run folder) first, then load the data and train."""
    trainer = _resume(args) if args.resume else _start(args)
    with trainer:
        say = trainer.procs.is_main  # under torchrun, rank 0 speaks for all processes
        if say:
            print(f"metasam train: {datasets_summary(trainer.train_ds, trainer.val_ds, trainer.test_ds)}", file=sys.stderr)
        try:
            summary = trainer.train(progress=not args.no_progress)
        except KeyboardInterrupt as exc:
            if say:
                print(f"metasam train: {exc}", file=sys.stderr)
            return 130
    if say:
        print(json.dumps(summary, indent=2))
    return 0


def config_of(args: argparse.Namespace) -> MetaTrainConfig:
    """The run the flags of a new ``metasam train`` describe (checked: see :class:`MetaTrainConfig`)."""
    inner_rule, outer_rule = rules_from_flags(args)
    try:
        return MetaTrainConfig(**settings_given(args), inner_rule=inner_rule, outer_rule=outer_rule)
    except ConfigError as exc:  # the library's names of the settings (inner_lr) as the flags typed (--inner-lr)
        raise ConfigError(as_flags(str(exc))) from exc


def _start(args: argparse.Namespace) -> MetaTrainer:
    if not args.out:
        raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR)")
    cfg = config_of(args)
    check_new_run_dir(args.out)
    check_device(cfg.device)
    trainer = MetaTrainer(cfg, args.out)
    trainer.start()
    return trainer


def _resume(args: argparse.Namespace) -> MetaTrainer:
    run_dir = Path(args.resume)
    if run_dir.is_file():
        raise ConfigError(f"--resume takes the run folder, not a file in it: use --resume {run_dir.parent}")
    ignored = [k for k, v in vars(args).items()
               if k in DEFAULTS and k not in ("resume", "no_progress", *RESUME_OVERRIDES) and v != DEFAULTS[k]]
    if ignored:
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUME_OVERRIDES)
        raise ConfigError(
            f"--resume continues {run_dir} with its saved config.json; drop "
            f"{', '.join('--' + k.replace('_', '-') for k in ignored)} (only {allowed} and --no-progress may be "
            "given), or start a new run with --out"
        )
    cfg = MetaTrainConfig.load(run_dir)
    overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    ckpt = None
    if (run_dir / "last.pt").exists():
        ckpt = load_run_checkpoint(run_dir / "last.pt", cfg)
        done = ckpt["learner"]["iteration"]
        if cfg.iterations < done:
            raise ConfigError(f"--iterations {cfg.iterations} is below the {done} iterations {run_dir} has done; "
                              f"pass --iterations {done} or more")
    else:
        check_restartable(run_dir)
    check_device(cfg.device)
    check_writable(run_dir)
    try:
        trainer = MetaTrainer(cfg, run_dir)
    except RunFolderInUse as exc:
        raise RunFolderInUse(f"{exc}. To give a running run more iterations, stop it (Ctrl-C, or kill -TERM: it saves "
                             f"last.pt), then: metasam train --resume {run_dir} --iterations N") from exc
    if ckpt is None:
        if trainer.procs.is_main:
            print(f"metasam train: {run_dir} stopped before its first checkpoint; starting it from iteration 0 "
                  "with its config.json", file=sys.stderr)
        trainer.start(restart=True)
    else:
        trainer.resume(ckpt)
    return trainer
