"""``metasam evaluate``: mean accuracy ± 95 % CI of a run on a fixed, seeded set of test tasks."""

from __future__ import annotations

import argparse
import json
import sys

from metasam.cli.flags import NON_TRANSDUCTIVE_HELP, add
from metasam.train.distributed import main_process
from metasam.train.evaluation import evaluate_run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a meta-training run on fixed test tasks",
                       description="Mean accuracy ± 95 % CI of a run's checkpoint on a fixed, seeded set of test tasks; "
                       "also written to RUN_DIR/eval_<checkpoint>_<episodes>_seed<seed>.json (suffixed _<rule>, "
                       "_steps<K> or _split-<hash> where --test-rule, --test-inner-steps or --test-split differ from the run's, "
                       "and _nontransductive with --non-transductive).")
    p.add_argument("run_dir", help="the run folder")
    add(p, "--episodes", type=int, default=600, help="test tasks")
    add(p, "--seed", type=int, default=1234, help="seed of the test TaskSet (same seed: same tasks)")
    add(p, "--checkpoint", choices=("best", "last"), default="best", help="best validation accuracy, or the last")
    add(p, "--test-split", default=None, help="default: the run's test split")
    add(p, "--test-inner-steps", type=int, default=None, help="inner steps at test time (default: the run's)")
    add(p, "--test-rule", choices=("same", "gd"), default=None,
        help="how the tasks are adapted at test time: same (the run's inner rule) or gd (plain gradient descent, to "
             "tell what a sharpness-aware rule adds at test time from what it adds in training); default: the run's")
    add(p, "--non-transductive", action="store_true", help=NON_TRANSDUCTIVE_HELP)
    add(p, "--json", action="store_true",
        help="print the result (with each task's accuracy) as JSON on stdout, and the summary line on stderr")
    add(p, "--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run_dir, args.episodes, args.seed, args.checkpoint, args.test_split, args.test_inner_steps,
                          progress=not args.no_progress, test_rule=args.test_rule,
                          transductive=not args.non_transductive)
    if not main_process():  # under torchrun, rank 0 reports for all processes
        return 0
    line = (f"{result['algo']}: {100 * result['accuracy']:.2f} % ± {100 * result['ci95']:.2f} "
            f"({result['episodes']} tasks of {result['test_split']}, {result['ways']}-way {result['shots']}-shot, "
            f"{result['test_inner_steps']} inner steps, test rule {result['test_rule']}"
            f"{'' if result['transductive'] else ', queries one by one (non-transductive)'})")
    if args.json:
        print(f"metasam evaluate: {line}", file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(line)
        print(json.dumps({k: v for k, v in result.items() if k != "task_accuracies"}, indent=2))
    return 0
