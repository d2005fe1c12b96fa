"""``metasam evaluate``: mean accuracy ± 95 % CI of a run on a fixed, seeded set of test tasks."""

from __future__ import annotations

import argparse
import json

from metasam.train.distributed import main_process
from metasam.train.evaluation import evaluate_run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a meta-training run on fixed test tasks")
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=1234, help="seed of the test TaskSet (same seed: same tasks)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--test-split", default=None, help="default: the run's test split")
    p.add_argument("--steps", type=int, default=None, help="inner steps at test time (default: the run's)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run_dir, args.episodes, args.seed, args.checkpoint, args.test_split, args.steps,
                          progress=not args.no_progress)
    if not main_process():  # under torchrun, rank 0 reports for all processes
        return 0
    print(f"{result['algo']}: {100 * result['accuracy']:.2f} % ± {100 * result['ci95']:.2f} "
          f"({result['episodes']} tasks of {result['test_split']}, {result['ways']}-way {result['shots']}-shot)")
    print(json.dumps({k: v for k, v in result.items() if k != "task_accuracies"}, indent=2))
    return 0
