"""``metasam`` entry point: one sub-command per job; our own errors become one-line messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from metasam.cli import analyze, bench, evaluate, plot, supervised, train
from metasam.errors import MetaSAMError

COMMANDS = {"train": train, "evaluate": evaluate, "bench": bench, "supervised": supervised,
            "analyze": analyze, "plot": plot}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metasam", description="Sharpness-aware meta-learning toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except MetaSAMError as exc:
        print(f"metasam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
