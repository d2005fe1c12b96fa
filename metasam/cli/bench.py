"""``metasam bench``: train and evaluate algorithms × settings, write a Markdown table and raw JSON."""

from __future__ import annotations

import argparse

from metasam.meta import PRESETS
from metasam.train.bench import parse_settings, run_grid
from metasam.train.precision import TF32_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="train + evaluate a grid of algorithms and N-way K-shot settings",
                       description="Each cell is a normal run folder OUT/<ways>w<shots>s/<algo> (resumable); "
                       "OUT/results.md holds the table (accuracy %% ± 95%% CI), OUT/results.json the raw numbers.")
    p.add_argument("--dataset", choices=("omniglot", "miniimagenet", "glyphs"), default="glyphs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--algos", default="maml,sharp-maml-low,agnostic-sam", help=f"comma list of {', '.join(PRESETS)}")
    p.add_argument("--settings", default="5w1s,5w5s", help="comma list like 5w1s,5w5s,20w1s,20w5s")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--meta-batch", type=int, default=None)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--train-split", default=None)
    p.add_argument("--val-split", default=None)
    p.add_argument("--test-split", default=None)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--episodes", type=int, default=600, help="test tasks per cell (the same for every method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tf32", action="store_true", default=None, help=TF32_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    settings = parse_settings(args.settings)
    keys = ("dataset", "data_root", "iterations", "meta_batch", "queries", "train_split", "val_split", "test_split",
            "val_every", "val_tasks", "seed", "device", "tf32")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    grid = run_grid(overrides, algos, settings, args.out, episodes=args.episodes, progress=not args.no_progress)
    print(grid["table"])
    return 0
