"""``metasam plot``: training curves (and gradient alignment) of one or several runs on one PNG."""

from __future__ import annotations

import argparse

from metasam.analysis import plot_alignment, plot_runs
from metasam.cli.flags import add


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="training curves of one or several runs on one PNG")
    p.add_argument("run_dirs", nargs="+", help="run folders (each with its metrics.jsonl)")
    add(p, "--out", default="curves.png", help="the PNG to write (refused if it exists, unless --overwrite)")
    add(p, "--overwrite", action="store_true", help="replace --out if it exists")
    add(p, "--alignment", action="store_true", help="plot cos(g_S, g_V) before and after each logged update instead (runs trained with --alignment-every N)")


def run(args: argparse.Namespace) -> int:
    path = (plot_alignment if args.alignment else plot_runs)(args.run_dirs, args.out, overwrite=args.overwrite)
    print(path)
    return 0
