"""``metasam analyze`` and ``metasam plot``: sharpness diagnostics and training curves of runs."""

from __future__ import annotations

import argparse
import json

from metasam.cli.flags import add
from metasam.train.analyze import DEFAULTS, MAX_EIGENVALUES, MAX_STEPS, analyze_run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="top Hessian eigenvalues and a 2-D loss landscape of a run",
                       description="Writes analysis.json and landscape_{contour,surface}.png into the run folder (with other "
                       "settings than the defaults, names that say them, e.g. analysis_hessian_k20.json: no analysis "
                       "overwrites another; the same settings again are refused unless --overwrite). "
                       "Meta runs: the best checkpoint's loss over validation tasks; supervised runs: the final "
                       "model's training loss.")
    p.add_argument("run_dir", help="the run folder (metasam train or metasam supervised)")
    add(p, "--hessian", action="store_true",
        help="top-k eigenvalues (Lanczos on Hessian-vector products); without --hessian or --landscape: both")
    add(p, "--landscape", action="store_true", help="loss on a grid along two filter-normalised directions")
    add(p, "--k", type=int, default=DEFAULTS["k"], help=f"eigenvalues to compute, at most {MAX_EIGENVALUES}")
    add(p, "--tasks", type=int, default=DEFAULTS["tasks"], help="meta runs: validation tasks the loss averages over")
    add(p, "--loss", choices=("query", "support"), default=DEFAULTS["loss"],
        help="meta runs: post-adaptation query loss, or the support loss at θ")
    add(p, "--steps", type=int, default=DEFAULTS["steps"], help=f"landscape grid points per axis, at most {MAX_STEPS}")
    add(p, "--span", type=float, default=DEFAULTS["span"], help="landscape grid covers [-span, span]²")
    add(p, "--seed", type=int, default=DEFAULTS["seed"], help="seeds the Lanczos start vector and the landscape directions")
    add(p, "--overwrite", action="store_true", help="replace the files of an earlier analysis with the same settings")


def run(args: argparse.Namespace) -> int:
    both = not (args.hessian or args.landscape)
    result = analyze_run(args.run_dir, args.hessian or both, args.landscape or both, k=args.k, tasks=args.tasks, loss=args.loss,
                         steps=args.steps, span=args.span, seed=args.seed,
                         overwrite=args.overwrite)
    summary = {k: v for k, v in result.items() if k != "landscape"}
    if "landscape" in result:
        summary["landscape_plots"] = result["landscape"]["plots"]
    print(json.dumps(summary, indent=2))
    return 0
