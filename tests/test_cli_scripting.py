"""A CLI a researcher can script: --version, a help line and the default for every flag, JSON on stdout when
asked, `analyze` doing both diagnostics by default, and other libraries' warnings left as they are."""

from __future__ import annotations

import json
import re
import warnings

import pytest

import metasam
from metasam.cli import analyze, bench, evaluate, train
from metasam.cli.main import main

COMMANDS = ["train", "evaluate", "analyze", "bench", "supervised", "plot"]
TINY = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "2",
        "--val-every", "2", "--val-tasks", "3", "--no-progress"]


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"metasam {metasam.__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_a_help_line(command, capsys):
    options = help_text(command, capsys).split("options:")[1]
    entries = re.split(r"\n  (?=-)", options)[1:]  # one entry per flag, with its wrapped help
    assert entries
    for entry in entries:
        flag, _, rest = entry.partition("  ")
        assert rest.strip(), f"{command} {flag.split()[0]} has no help"


@pytest.mark.parametrize("module", [train, bench])
def test_every_default_is_shown(module, capsys):
    command = module.__name__.rsplit(".", 1)[1]
    text = " ".join(help_text(command, capsys).split())  # undo argparse's line wrapping
    defaults = module.DEFAULTS if module is train else vars(_bench_defaults())
    for name, value in defaults.items():
        if value is not None and value is not False and name not in ("out", "command"):
            assert f"(default: {value})" in text.replace("- ", "-"), f"{command} --{name}: default {value} not shown"
    assert "%%" not in text


def _bench_defaults():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    bench.add_parser(sub)
    return sub.choices["bench"].parse_args(["--out", "x"])


def test_evaluate_json_writes_pure_json_on_stdout_and_the_summary_on_stderr(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--episodes", "4", "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert len(result["task_accuracies"]) == 4 and result["episodes"] == 4
    assert err.startswith("metasam evaluate: maml: ") and "(4 tasks of test, 3-way 1-shot, " in err


def test_analyze_without_a_flag_runs_both_diagnostics(monkeypatch, capsys):
    asked = []

    def analyze_run(run_dir, hessian, landscape, **kwargs):
        asked.append((hessian, landscape))
        return {"run": run_dir}

    monkeypatch.setattr(analyze, "analyze_run", analyze_run)
    for flags, both in (([], (True, True)), (["--hessian"], (True, False)), (["--landscape"], (False, True))):
        assert main(["analyze", "RUN", *flags]) == 0
        assert asked.pop() == both


def test_other_libraries_warnings_are_not_relabelled_as_metasams(monkeypatch, capsys):
    def run(args):
        warnings.warn_explicit("a torch warning", UserWarning, "/site-packages/torch/nn/modules/module.py", 7)
        warnings.warn_explicit("a metasam warning", UserWarning, metasam.__file__, 1)
        return 0

    shown_as_python_shows_them = []
    monkeypatch.setattr(evaluate, "run", run)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kw: shown_as_python_shows_them.append(str(message)))
    assert main(["evaluate", "somewhere"]) == 0
    assert shown_as_python_shows_them == ["a torch warning"]
    assert capsys.readouterr().err == "metasam evaluate: warning: a metasam warning\n"
