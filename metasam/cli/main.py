"""``metasam`` entry point: one sub-command per job; our own errors become one-line messages."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import metasam

from metasam.cli import analyze, bench, evaluate, plot, supervised, train
from metasam.atomic_write import write_failure
from metasam.errors import ConfigError, MetaSAMError
from metasam.train.distributed import launched_as, leave
from metasam.train.memory import retain_freed_memory

COMMANDS = {"train": train, "evaluate": evaluate, "bench": bench, "supervised": supervised,
            "analyze": analyze, "plot": plot}
DISTRIBUTED = {"train", "evaluate", "bench"}  # the commands that share their work under torchrun
PACKAGE = Path(metasam.__file__).resolve().parent
"""Warnings raised from files under here are metasam's and get its one-line form."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metasam", description="Sharpness-aware meta-learning toolkit.")
    parser.add_argument("--version", action="version", version=f"metasam {metasam.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; our errors and the file system's print one line and return 2, Ctrl-C outside
    training returns 130."""
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # fewer page faults on CPU; changes no result (metasam/train/memory.py)
    who = f"metasam {args.command}"  # under torchrun, its rank is added once known

    others = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if Path(filename).resolve().is_relative_to(PACKAGE):
            print(f"{who}: warning: {message}", file=sys.stderr)
        else:  # torch's, numpy's, …: shown as Python shows them, not as ours
            others(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            rank, world_size = launched_as()
            if world_size > 1:
                who += f" [rank {rank}/{world_size}]"
                if args.command not in DISTRIBUTED:
                    raise ConfigError(f"metasam {args.command} runs in one process: start it without torchrun "
                                      f"(only {', '.join(sorted(DISTRIBUTED))} share their work between processes)")
            code = COMMANDS[args.command].run(args)
            if code == 0:
                leave()
            return code
        except MetaSAMError as exc:
            print(f"{who}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # the file system refused a read or write none of our checks foresaw
            print(f"{who}: error: {file_system_error(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:  # a run stopped by SIGINT/SIGTERM says how to resume; else Ctrl-C mid-load
            print(f"{who}: {exc or 'interrupted'}", file=sys.stderr)
            return 130


def file_system_error(exc: OSError) -> str:
    """One line for an ``OSError``: the file, what went wrong and what to do."""
    if not exc.filename:
        return f"{exc.strerror or exc}"
    reason, remedy = write_failure(Path(exc.filename).parent, exc)
    return f"{exc.filename}: {reason}. {remedy}"


if __name__ == "__main__":
    sys.exit(main())
