"""The plan of a metasam bench, without training: grids and their tiny expression language, the run configuration
of each cell, the controls, the flags it shares with metasam train, and its refusals (one line, before any data)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

from metasam.cli import bench, train
from metasam.cli.flags import run_settings
from metasam.cli.main import main
from metasam.errors import ConfigError
from metasam.meta.rules import AgnosticRule, SAMRule
from metasam.train import meta
from metasam.train.bench import BenchPlan, parse_settings
from metasam.train.bench.grid import Axis, Tie, edges, grid_points, parse_grid
from metasam.train.bench.plan import Cell


def parser_of(module) -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    module.add_parser(sub)
    return next(iter(sub.choices.values()))


def test_every_run_flag_of_train_is_a_flag_of_bench_with_the_same_default_type_and_help():
    bench_actions = {a.dest: a for a in parser_of(bench)._actions}
    shared = [a for a in parser_of(train)._actions if a.dest not in ("help", "out", "resume", "no_progress")]
    assert len(shared) > 40  # every run setting and rule setting
    for action in shared:
        if action.dest in bench.GRID_AXES:
            assert action.dest not in bench_actions
            continue
        twin = bench_actions[action.dest]
        for attr in ("option_strings", "default", "type", "choices", "help", "nargs", "const", "metavar"):
            assert getattr(twin, attr) == getattr(action, attr), f"--{action.dest}: {attr} differs"


def test_each_run_flag_states_the_configurations_default():
    helps = {a.dest: a.help for a in parser_of(train)._actions}
    for f in run_settings():
        if f.default is not None and f.default is not False:
            assert f"(default: {f.default})" in helps[f.name], f.name


def test_grid_specs_and_tied_settings():
    assert parse_grid("sharp-maml-low:inner_rho=0.002,0.005") == ("sharp-maml-low", Axis("inner_rho", (0.002, 0.005)))
    assert parse_grid("agnostic-sam:inner_rho2=rho1/2") == ("agnostic-sam", Tie("inner_rho2", "inner_rho1", "/", 2.0))
    assert parse_grid("maml:first_order=true,false")[1] == Axis("first_order", (True, False))
    assert parse_grid("maml:meta_batch=4,8")[1] == Axis("meta_batch", (4, 8))
    entries = [Axis("inner_rho1", (0.01, 0.02, 0.05)), Tie("inner_rho2", "inner_rho1", "/", 2.0), Axis("inner_lr", (0.1, 0.4))]
    points = grid_points(entries, "agnostic-sam")
    assert len(points) == 6 and points[0] == {"inner_rho1": 0.01, "inner_lr": 0.1, "inner_rho2": 0.005}
    assert [p["inner_rho2"] for p in points[::2]] == [0.005, 0.01, 0.025]  # rounded: 0.01 / 2 is 0.005
    assert edges(entries, points[0]) == ["inner_rho1=0.01 is the smallest of 0.01, 0.02, 0.05",
                                         "inner_lr=0.1 is the smallest of 0.1, 0.4"]
    assert edges(entries, points[3]) == ["inner_lr=0.4 is the largest of 0.1, 0.4"]  # ρ1 = 0.02: inside its grid
    assert grid_points([], "maml") == [{}]


@pytest.mark.parametrize("spec, message", [
    ("maml", "is not of the form ALGO:KEY=V1,V2"),
    ("maml:seed=1,2", "maml:seed=1,2: seed is the same for every cell of a bench; set it with --seeds"),
    ("maml:val_tasks=5,10", "set it with --val-tasks"),
    ("maml:inner_speed=1", "no setting 'inner_speed'; a grid varies one of"),
    ("maml:inner_lr=0.1,fast", "'fast' is not a float"),
    ("agnostic-sam:inner_rho2=rho1**2", "is not a float"),
    ("maml:inner_lr=0.1,0.1", "a value is listed twice"),
])
def test_bad_grid_specs_are_named(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        parse_grid(spec)


def test_each_cell_takes_the_settings_its_algorithm_takes():
    plan = BenchPlan(settings=parse_settings("5w2s"), algos=["maml", "sharp-maml-low", "agnostic-sam"], seeds=[0, 3],
                     grids=["agnostic-sam:inner_rho1=0.02,0.04", "agnostic-sam:inner_rho2=rho1/2", "maml:inner_lr=0.1,0.2"],
                     overrides={"iterations": 7, "val_view": "split"}, rules={"inner": {"rho": 0.003, "beta": 0.5}, "outer": {}})
    cells = plan.grid_cells()
    assert [str(c.folder) for c in cells[:3]] == ["5w2s/maml/inner_lr=0.1/seed0", "5w2s/maml/inner_lr=0.1/seed3",
                                                   "5w2s/maml/inner_lr=0.2/seed0"]
    assert len(cells) == (2 + 1 + 2) * 2
    configs = {str(c.folder): plan.config(c) for c in cells}
    maml = configs["5w2s/maml/inner_lr=0.2/seed3"]
    assert (maml.inner_lr, maml.seed, maml.iterations, maml.val_view, maml.shots) == (0.2, 3, 7, "support", 2)
    assert configs["5w2s/sharp-maml-low/seed0"].inner_rule == SAMRule(rho=0.003)
    agnostic = configs["5w2s/agnostic-sam/inner_rho1=0.04,inner_rho2=0.02/seed0"]
    assert agnostic.inner_rule == AgnosticRule(rho1=0.04, rho2=0.02, beta=0.5) and agnostic.val_view == "split"


def test_the_controls_of_a_selected_agnostic_point():
    plan = BenchPlan(settings=[(5, 1)], algos=["maml", "agnostic-sam"], grids=["agnostic-sam:inner_rho1=0.03,0.05",
                     "agnostic-sam:inner_rho2=rho1/3", "agnostic-sam:inner_lr=0.2"], rules={"inner": {"adaptive": True}, "outer": {}})
    selected = {m.algo: m for m in plan.methods() if m.algo == "maml" or dict(m.point).get("inner_rho1") == 0.03}
    radius, beta0, test_rule = plan.controls_of(5, 1, selected)
    assert (radius.algo, dict(radius.point)) == ("sharp-maml-low", {"inner_lr": 0.2, "inner_rho": 0.02})
    assert plan.config(Cell(5, 1, radius.algo, radius.point, 0)).inner_rule == SAMRule(rho=0.02, adaptive=True)
    assert dict(beta0.point) == {"inner_lr": 0.2, "inner_rho1": 0.03, "inner_rho2": 0.01, "inner_beta": 0.0}
    assert (test_rule.point, test_rule.test_rule) == (selected["agnostic-sam"].point, "gd")


@pytest.fixture
def no_data(monkeypatch):
    monkeypatch.setattr(meta, "load_splits", mock.Mock(side_effect=AssertionError("data loaded before the settings were checked")))


PLAN_ERRORS = [  # (flags, a part of the error line)
    (["--algos", "maml,sam"], "--algos: unknown sam; choose from maml, fomaml"),
    (["--algos", "sharp-maml-low"], "--reference maml is not one of --algos sharp-maml-low; pass --reference sharp-maml-low"),
    (["--grid", "fomaml:inner_lr=0.1"], "--grid fomaml:inner_lr=0.1: fomaml is not one of --algos maml,agnostic-sam; add it there"),
    (["--inner-rho", "0.1"], "--inner-rho is a setting of none of --algos maml,agnostic-sam; drop it"),
]
CELL_ERRORS = [
    (["--grid", "maml:inner_rho=0.1"], "5w1s maml at inner_rho=0.1: maml does not use --inner-rho: its inner rule is 'gd', which takes nothing"),
    (["--grid", "agnostic-sam:inner_rho2=rho1/2"], "inner_rho1 is not a listed setting of agnostic-sam's grid; grid it too"),
    (["--val-view", "split"], "5w1s agnostic-sam: --val-view split takes half of each class's support images, which needs --shots 2"),
]
SYNTAX_ERRORS = [
    (["--seeds", "0,0"], "--seeds 0,0: give distinct integers >= 0"),
    (["--seeds", "a"], "--seeds 'a' is not a comma list of integers"),
    (["--settings", "5way1shot"], "setting '5way1shot' is not of the form <ways>w<shots>s"),
    (["--shard", "3/3"], "--shard '3/3' is not I/N with 0 <= I < N"),
    (["--episodes", "0"], "--episodes must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("flags, message", PLAN_ERRORS + CELL_ERRORS + SYNTAX_ERRORS)
def test_bad_bench_settings_are_one_line_before_any_data_loads(tmp_path, capsys, no_data, flags, message):
    out = tmp_path / "out"
    assert main(["bench", "--algos", "maml,agnostic-sam", "--settings", "5w1s", *flags, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("metasam bench: error: ") and message in err, err
    assert not out.exists()


def test_a_grid_value_that_is_code_is_refused_and_never_run(tmp_path, capsys, no_data):
    marker = tmp_path / "ran"
    payload = f"agnostic-sam:inner_rho2=__import__('pathlib').Path('{marker}').touch() or rho1/2"
    assert main(["bench", "--algos", "maml,agnostic-sam", "--settings", "5w1s", "--grid", "agnostic-sam:inner_rho1=0.1",
                 "--grid", payload, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("metasam bench: error: ") and "is not a float" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_merge_needs_a_bench_folder_and_refuses_an_old_one_seed_layout(tmp_path, capsys, no_data):
    assert main(["bench", "--out", str(tmp_path), "--merge"]) == 2
    assert capsys.readouterr().err.strip() == (f"metasam bench: error: {tmp_path} has no bench.json: it is not the folder of "
                                               "a metasam bench; pass the --out the bench (or its shards) ran with")
    old = tmp_path / "5w1s" / "maml"
    old.mkdir(parents=True)
    (old / "config.json").write_text('{"dataset": "glyphs", "algo": "maml"}')
    assert main(["bench", "--algos", "maml", "--settings", "5w1s", "--out", str(tmp_path)]) == 2
    assert f"{old} is a run of an earlier metasam bench (one seed per cell" in capsys.readouterr().err


def test_the_reproduce_command_of_the_bench_page_describes_a_valid_bench():
    """The whole command docs/bench.md quotes in prose parses, and each cell's run configuration is valid (its
    shell blocks are checked by tests/test_docs_commands.py)."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "bench.md").read_text()
    commands = [shlex.split(m)[2:] for m in re.findall(r"`(metasam bench --out runs/bench-glyphs [^`]*)`", page)]
    assert len(commands) == 1
    plan = bench.plan_of(parser_of(bench).parse_args(commands[0]))
    for cell in plan.grid_cells():
        plan.config(cell)
