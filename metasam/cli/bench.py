"""``metasam bench``: train and evaluate algorithms × settings, write a Markdown table and raw JSON."""

from __future__ import annotations

import argparse

from metasam.cli.flags import add
from metasam.meta import PRESETS
from metasam.train.bench import parse_settings, run_grid
from metasam.train.precision import TF32_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="train + evaluate a grid of algorithms and N-way K-shot settings",
                       description="Each cell is a normal run folder OUT/<ways>w<shots>s/<algo> (resumable); "
                       "OUT/results.md holds the table (accuracy % ± 95 % CI), OUT/results.json the raw numbers. "
                       "Unset hyperparameters take the standard setting of each setting's ways and shots.")
    add(p, "--dataset", choices=("omniglot", "miniimagenet", "glyphs"), default="glyphs",
        help="glyphs is synthetic and offline (rendered from fonts)")
    add(p, "--data-root", default=None, help="folder holding the dataset (default: $METASAM_DATA)")
    add(p, "--algos", default="maml,sharp-maml-low,agnostic-sam", help=f"comma list of {', '.join(PRESETS)}")
    add(p, "--settings", default="5w1s,5w5s", help="comma list of <ways>w<shots>s, like 5w1s,5w5s,20w1s,20w5s")
    add(p, "--iterations", type=int, default=1000, help="outer steps of each run (the papers train 60,000)")
    add(p, "--meta-batch", type=int, default=None, help="tasks per outer step (default: the standard setting)")
    add(p, "--queries", type=int, default=15, help="query images per class")
    add(p, "--train-split", default=None, help="meta-training split (default: the dataset's)")
    add(p, "--val-split", default=None, help="validation split (default: the dataset's)")
    add(p, "--test-split", default=None, help="test split (default: the dataset's)")
    add(p, "--val-every", type=int, default=100, help="iterations between validations (and checkpoints)")
    add(p, "--val-tasks", type=int, default=100, help="tasks of the fixed validation set")
    add(p, "--episodes", type=int, default=600, help="test tasks per cell (the same for every method)")
    add(p, "--seed", type=int, default=0, help="seeds every run")
    add(p, "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    add(p, "--tf32", action="store_true", default=None, help=TF32_HELP)
    add(p, "--out", required=True, help="folder of the grid: OUT/<ways>w<shots>s/<algo> and the tables")
    add(p, "--no-progress", action="store_true", help="no progress bars")

def run(args: argparse.Namespace) -> int:
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    settings = parse_settings(args.settings)
    keys = ("dataset", "data_root", "iterations", "meta_batch", "queries", "train_split", "val_split", "test_split",
            "val_every", "val_tasks", "seed", "device", "tf32")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    grid = run_grid(overrides, algos, settings, args.out, episodes=args.episodes, progress=not args.no_progress)
    print(grid["table"])
    return 0
