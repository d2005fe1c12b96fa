"""Every ``metasam`` command the README and docs show is one today's CLI accepts, so that a results page's
command still reproduces it and a renamed flag cannot survive in the docs.

- A command in a shell block is parsed as the CLI parses it and, for
  ``train``, ``bench`` (each of its cells) and ``supervised``, turned into its checked configuration (what the
  CLI does before it loads any data). A block's own variables (``COMMON="..."``) and ``for`` loops are
  expanded first, as the shell would.
- A synopsis (``[--k 5]``, ``sgd|sam``, ``...``) and a command quoted in prose name only flags their
  sub-command has (prose also quotes fragments, ``metasam plot --alignment``, and commands the CLI refuses,
  in docs/reliability.md).
- A benchmark command (``python benchmarks/NAME.py ...``, in any page, as the results pages print it) names
  only flags the script's ``--help`` lists.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from metasam.cli import bench, supervised, train
from metasam.cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"(?:^|(?<=[\s$(]))metasam ((?:" + "|".join(COMMANDS) + r")\b[^#\n`]*)")
ASSIGNMENT = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)=(.*)$")
LOOP = re.compile(r"^\s*for (\w+) in ([^;]+); do\s*(?:#.*)?$")


def expand(block: str) -> list[str]:
    """The block's lines as the shell would run them: continuations joined, ``NAME=value`` lines
    substituted into later ``$NAME``, and a ``for`` loop's body repeated once per value."""
    variables: dict[str, str] = {}
    lines: list[str] = []
    loop: tuple[str, list[str]] | None = None
    body: list[str] = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        if loop is not None:
            if line.strip() == "done":
                name, values = loop
                lines += [re.sub(rf"\${{?{name}\b}}?", value, b) for value in values for b in body]
                loop, body = None, []
            else:
                body.append(line)
            continue
        if match := LOOP.match(line):
            loop = match[1], match[2].split()
            continue
        if (match := ASSIGNMENT.match(line)) and " metasam " not in f" {match[2]} ":
            variables[match[1]] = " ".join(shlex.split(match[2]))
            continue
        for name, value in variables.items():
            line = re.sub(rf"\${{?{name}\b}}?", value, line)
        lines.append(line)
    return lines


def is_synopsis(words: list[str]) -> bool:
    return any(w.startswith("[") or "|" in w or w in ("...", "…") for w in words)


def shown_commands() -> tuple[list, list]:
    """(commands of shell blocks, synopses and commands quoted in prose), each as (page, words)."""
    runnable, mentioned = [], []
    for page in PAGES:
        text = page.read_text()
        name = str(page.relative_to(ROOT))
        blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
        for lang, block in blocks:
            if lang == "python":
                continue
            for line in expand(block):
                if match := COMMAND.search(line):
                    command = re.split(r"\s(?:&&|\|\||;|\||2?>)\s", match[1].strip())[0]
                    words = shlex.split(command)
                    (mentioned if is_synopsis(words) else runnable).append((name, words))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if match := COMMAND.match(span):
                mentioned.append((name, shlex.split(match[1])))
    return runnable, mentioned


RUNNABLE, MENTIONED = shown_commands()


def test_the_docs_show_commands_of_every_kind():
    assert len(RUNNABLE) >= 25 and len(MENTIONED) >= 40
    assert {words[0] for _, words in RUNNABLE + MENTIONED} == set(COMMANDS)


def parse(words: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(words)
        except SystemExit:
            pytest.fail(err.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("page,words", RUNNABLE, ids=[f"{p}:{' '.join(w)[:60]}" for p, w in RUNNABLE])
def test_a_shown_command_is_accepted_with_its_settings(page, words):
    args = parse(words)
    if args.command == "train" and not args.resume:
        train.config_of(args)
    elif args.command == "bench" and not args.merge:
        plan = bench.plan_of(args)
        for cell in plan.grid_cells():
            plan.config(cell)
    elif args.command == "supervised":
        supervised.config_of(args)


def flags_of(command: str) -> set[str]:
    """The flags ``metasam COMMAND --help`` lists."""
    sub = argparse.ArgumentParser().add_subparsers()
    COMMANDS[command].add_parser(sub)
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", sub.choices[command].format_help()))


@pytest.mark.parametrize("page,words", MENTIONED, ids=[f"{p}:{' '.join(w)[:60]}" for p, w in MENTIONED])
def test_a_synopsis_or_a_command_in_prose_names_only_flags_of_its_command(page, words):
    named = {m[0] for w in words for m in re.finditer(r"--[a-z0-9][a-z0-9-]*", w)}
    assert named <= flags_of(words[0]), f"{page}: metasam {words[0]} has no {', '.join(sorted(named - flags_of(words[0])))}"


BENCHMARK = re.compile(r"python (?:-m )?benchmarks/(\w+)\.py([^`#\n\"]*)")
BENCHMARK_COMMANDS = [(str(page.relative_to(ROOT)), match[1], match[2])
                      for page in PAGES for match in BENCHMARK.finditer(re.sub(r"\\\n\s*", " ", page.read_text()))]


@cache
def script_flags(script: str) -> set[str]:
    """The flags ``python benchmarks/SCRIPT.py --help`` lists."""
    run = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", run.stdout))


def test_the_docs_show_the_benchmarks_commands():
    assert len(BENCHMARK_COMMANDS) >= 15 and {"throughput", "noisy_labels", "allocator"} <= {s for _, s, _ in BENCHMARK_COMMANDS}


@pytest.mark.parametrize("script", sorted({s for _, s, _ in BENCHMARK_COMMANDS}))
def test_a_benchmark_command_in_the_docs_names_only_flags_of_its_script(script):
    for page, _, rest in (c for c in BENCHMARK_COMMANDS if c[1] == script):
        named = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", rest))
        assert named <= script_flags(script), f"{page}: benchmarks/{script}.py has no {', '.join(sorted(named - script_flags(script)))}"
